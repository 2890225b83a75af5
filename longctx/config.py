"""Model configuration: one dataclass, HF field names, per-layer kinds derived once.

Facts (sizes, defaults, the meaning of each field) follow ``shared/docs/scout_architecture.md``
§1 and §5, i.e. Hugging Face's ``Llama4TextConfig``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration that can't describe a valid model (names the field and the reason)."""


# Sizes that must be positive ints. Checked before anything is derived or allocated: a config
# is untrusted input (a downloaded config.json), and a zero, negative, fractional or string
# size otherwise fails deep inside torch, or not at all.
_POSITIVE_INTS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "intermediate_size_mlp",
    "num_local_experts",
    "num_experts_per_tok",
    "interleave_moe_layer_step",
    "no_rope_layer_interval",
    "floor_scale",
    "max_position_embeddings",
)
_POSITIVE_FLOATS = ("rope_theta", "rms_norm_eps")
_BOOLS = ("use_qk_norm", "tie_word_embeddings", "chunk_markers")
# Per-layer lists are built from num_hidden_layers before the weights are seen: bound it so that
# a forged count cannot hang the process (Scout has 48 layers; published decoders, a few hundred).
MAX_LAYERS = 10_000


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(v) -> bool:
    """No NaN or infinity anywhere in v (numbers, nested lists and dicts)."""
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, dict):
        return all(_finite(x) for x in v.values())
    if isinstance(v, (list, tuple)):
        return all(_finite(x) for x in v)
    return True


def _scout_rope_scaling() -> dict:
    return {
        "rope_type": "llama3",
        "factor": 16.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
    }


@dataclass
class ModelConfig:
    """The Llama-4 text decoder's hyper-parameters (HF ``text_config`` names and defaults).

    ``no_rope_layers`` (1 = RoPE + chunked-local attention, 0 = NoPE global attention) and
    ``moe_layers`` may be left empty/None: they are then derived from the intervals exactly
    as transformers does. ``layer_kinds`` and ``is_moe`` are the derived per-layer lists
    that model code reads; nothing else recomputes them.
    """

    vocab_size: int = 202048
    hidden_size: int = 5120
    num_hidden_layers: int = 48
    num_attention_heads: int = 40
    num_key_value_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 8192  # each routed expert and the shared expert
    intermediate_size_mlp: int = 16384  # dense FFN layers (none in Scout)
    num_local_experts: int = 16
    num_experts_per_tok: int = 1
    interleave_moe_layer_step: int = 1
    moe_layers: list[int] | None = None
    rope_theta: float = 500000.0
    rope_scaling: dict | None = field(default_factory=_scout_rope_scaling)
    attention_chunk_size: int = 8192
    no_rope_layer_interval: int = 4
    no_rope_layers: list[int] = field(default_factory=list)
    use_qk_norm: bool = True
    attn_temperature_tuning: bool = True
    floor_scale: int = 8192
    attn_scale: float = 0.1
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 10485760
    tie_word_embeddings: bool = False
    bos_token_id: int = 200000
    eos_token_id: int | list[int] = field(default_factory=lambda: [200001, 200007, 200008])
    pad_token_id: int = 200018
    hidden_act: str = "silu"
    # longctx's own, not a HF field: the model was trained on corpora packed with chunk markers
    # (`Corpus.pack(chunk=attention_chunk_size)`), so `qa.Session` packs its corpus that way.
    chunk_markers: bool = False

    def __post_init__(self) -> None:
        self._validate_scalars()
        L = self.num_hidden_layers
        if not self.no_rope_layers:  # HF: an empty list means "derive from the interval"
            self.no_rope_layers = [int((i + 1) % self.no_rope_layer_interval != 0) for i in range(L)]
        if self.moe_layers is None:
            step = self.interleave_moe_layer_step
            self.moe_layers = list(range(step - 1, L, step))
        # Some published configs carry `attn_temperature_tuning: 4`; it is used as a flag.
        self.attn_temperature_tuning = bool(self.attn_temperature_tuning)
        self.no_rope_layers = [int(x) for x in self.no_rope_layers]
        self._validate()

    def _validate_scalars(self) -> None:
        """Types, ranges and finiteness of every field, before anything is derived from them."""

        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"ModelConfig.{name}: {why}, got {getattr(self, name)!r:.80}")

        for f in dataclasses.fields(self):
            if not _finite(getattr(self, f.name)):
                raise bad(f.name, "must be finite (no NaN or infinity)")
        for name in _POSITIVE_INTS:
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise bad(name, "must be a positive int")
        for name in _POSITIVE_FLOATS:
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise bad(name, "must be a positive finite number")
        if not isinstance(self.attn_scale, (int, float)) or isinstance(self.attn_scale, bool):
            raise bad("attn_scale", "must be a number")
        if self.attention_chunk_size is not None and (
            not _is_int(self.attention_chunk_size) or self.attention_chunk_size < 1
        ):
            raise bad("attention_chunk_size", "must be a positive int (or None when no layer is chunked)")
        if self.num_hidden_layers > MAX_LAYERS:
            raise bad("num_hidden_layers", f"is over {MAX_LAYERS}")
        for name in _BOOLS:
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be true or false")
        if not isinstance(self.attn_temperature_tuning, (bool, int)):
            raise bad("attn_temperature_tuning", "must be a flag (true/false or a number)")
        for name in ("bos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 0):
                raise bad(name, "must be a token id (an int >= 0)")
        eos = self.eos_token_id if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]
        if not eos or not all(_is_int(e) and e >= 0 for e in eos):
            raise bad("eos_token_id", "must be a token id or a non-empty list of them")
        # hidden_size need not equal num_attention_heads * head_dim (the projections map between
        # them), so it is not required to be divisible: HF's Llama 4 accepts such configs.
        for name in ("no_rope_layers", "moe_layers"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (list, tuple)) or not all(_is_int(x) for x in v)):
                raise bad(name, "must be a list of ints")
        if any(x not in (0, 1) for x in self.no_rope_layers):
            raise bad("no_rope_layers", "entries must be 0 (NoPE, global) or 1 (RoPE, chunked)")
        if self.moe_layers is not None and len(set(self.moe_layers)) != len(self.moe_layers):
            raise bad("moe_layers", "lists a layer twice")
        rs = self.rope_scaling
        if rs is not None:
            if not isinstance(rs, dict):
                raise bad("rope_scaling", "must be a dict or null")
            if rs.get("rope_type", rs.get("type")) == "llama3":
                for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                    v = rs.get(key)
                    if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                        raise bad("rope_scaling", f"{key} must be a positive number")

    def _validate(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"ModelConfig.{name}: {why}")

        if len(self.no_rope_layers) != self.num_hidden_layers:
            raise bad("no_rope_layers", f"has {len(self.no_rope_layers)} entries for {self.num_hidden_layers} layers")
        if self.num_attention_heads % self.num_key_value_heads:
            raise bad(
                "num_key_value_heads",
                f"{self.num_key_value_heads} does not divide {self.num_attention_heads} query heads",
            )
        if self.head_dim % 2:
            raise bad("head_dim", "must be even for RoPE on interleaved pairs")
        if any(not 0 <= i < self.num_hidden_layers for i in self.moe_layers):
            raise bad("moe_layers", f"indices out of range: {self.moe_layers}")
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise bad("num_experts_per_tok", f"{self.num_experts_per_tok} with {self.num_local_experts} experts")
        if "chunked" in self.layer_kinds and not self.attention_chunk_size:
            raise bad("attention_chunk_size", "must be set when any layer uses chunked attention")
        if self.hidden_act != "silu":
            raise bad("hidden_act", f"only 'silu' is supported, got {self.hidden_act!r}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "default"):
                raise bad("rope_scaling", f"rope_type {kind!r} is not supported (llama3 or default)")

    # ---- derived per-layer structure -----------------------------------------------------
    @property
    def layer_kinds(self) -> list[str]:
        """Per layer: ``"chunked"`` (RoPE, QK-norm, chunk-local mask) or ``"global"`` (NoPE)."""
        return ["chunked" if r else "global" for r in self.no_rope_layers]

    @property
    def local_chunk(self) -> int | None:
        """The chunk (tokens) that the local layers attend within; None if no layer is chunked."""
        return self.attention_chunk_size if "chunked" in self.layer_kinds else None

    @property
    def is_moe(self) -> list[bool]:
        moe = set(self.moe_layers)
        return [i in moe for i in range(self.num_hidden_layers)]

    @property
    def stop_ids(self) -> list[int]:
        e = self.eos_token_id
        return list(e) if isinstance(e, (list, tuple)) else [e]

    def num_parameters(self) -> int:
        """Parameter count of the text model (embedding and untied head included)."""
        d, hd = self.hidden_size, self.head_dim
        attn = d * hd * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        moe = (
            self.num_local_experts * 3 * d * self.intermediate_size
            + 3 * d * self.intermediate_size
            + self.num_local_experts * d
        )
        dense = 3 * d * self.intermediate_size_mlp
        n_moe = len(self.moe_layers)
        layers = self.num_hidden_layers * (attn + 2 * d) + n_moe * moe + (self.num_hidden_layers - n_moe) * dense
        heads = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return layers + heads + d

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> dict[str, int]:
        """KV bytes per context token: for all global layers, and per chunked layer (bounded)."""
        per_layer = 2 * self.num_key_value_heads * self.head_dim * dtype_bytes
        return {"global": per_layer * self.layer_kinds.count("global"), "per_layer": per_layer}

    # ---- presets and HF round trip ---------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        """``"scout"``: Llama-4-Scout-17B-16E text model. ``"tiny"``: a few-MB test model."""
        if name == "scout":
            return cls()
        if name == "tiny":
            return cls(
                vocab_size=512,
                hidden_size=64,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                intermediate_size=64,
                intermediate_size_mlp=128,
                num_local_experts=4,
                attention_chunk_size=32,
                floor_scale=32,
                max_position_embeddings=1 << 22,
                bos_token_id=256,
                eos_token_id=[257, 263, 264],
                pad_token_id=274,
            )
        raise ConfigError(f"unknown preset {name!r}; known: 'scout', 'tiny'")

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Read a HF ``config.json`` dict: a text config or a multimodal one with ``text_config``.

        RoPE may be ``rope_theta`` + ``rope_scaling`` (published Scout configs) or
        ``rope_parameters`` (transformers 5); unknown keys are ignored.
        """
        if isinstance(cfg, dict) and "text_config" in cfg:
            cfg = cfg["text_config"]
        if not isinstance(cfg, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(cfg).__name__}")
        cfg = dict(cfg)
        rp = cfg.pop("rope_parameters", None)
        for key, v in (("rope_parameters", rp), ("rope_scaling", cfg.get("rope_scaling"))):
            if v is not None and not isinstance(v, dict):
                raise ConfigError(f"ModelConfig.{key}: must be a dict or null, got {v!r:.80}")
        if rp:
            rp = dict(rp)
            cfg.setdefault("rope_theta", rp.pop("rope_theta", 500000.0))
            kind = rp.get("rope_type", "default")
            cfg["rope_scaling"] = None if kind == "default" else rp
        elif "rope_scaling" in cfg and cfg["rope_scaling"] is not None:
            cfg["rope_scaling"] = dict(cfg["rope_scaling"])
            if cfg["rope_scaling"].get("rope_type", cfg["rope_scaling"].get("type")) == "default":
                cfg["rope_scaling"] = None
        if cfg.get("no_rope_layers") is None:
            cfg["no_rope_layers"] = []
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in cfg.items() if k in names}
        hidden, heads = kwargs.get("hidden_size"), kwargs.get("num_attention_heads")
        if kwargs.get("head_dim") is None and _is_int(hidden) and _is_int(heads) and heads > 0:
            kwargs["head_dim"] = hidden // heads  # else the validator names the bad field
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """A text-config dict that ``from_hf`` (and transformers 4.57 / 5.x) read back."""
        d = dataclasses.asdict(self)
        if not d["chunk_markers"]:  # longctx's own field: only when set (fingerprints of other models unchanged)
            del d["chunk_markers"]
        d["model_type"] = "llama4_text"
        d["architectures"] = ["Llama4ForCausalLM"]
        return d

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_bytes())
        except OSError as e:
            raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_hf(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        except (TypeError, ValueError, KeyError) as e:  # shapes the validator does not foresee
            raise ConfigError(f"{path}: {type(e).__name__}: {e}") from None
