"""Floor 2, text: the tokenizer, prompt layout, document records, readers, ingest and packing.
Imports the model core only where it must; never imports ``longctx.tasks``."""
