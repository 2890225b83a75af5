"""Floor 3, tasks: needle-in-a-haystack, question answering with citations, batch jobs.
Built on the model core and ``longctx.text``; nothing below imports from here."""
