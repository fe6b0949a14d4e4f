"""PEFT LoRA adapters: the config, the tensors grouped by module, and PEFT's merge arithmetic.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or
``.bin``).  Its tensors are named ``base_model.model.<module path>.<part>``; this module
sorts them into

* :class:`LoraModule` -- the low-rank factors of one targeted module (Linear or Embedding),
  with the DoRA magnitude and ``lora_B`` bias when present, and the scale PEFT gives it;
* *full tensors* -- whole parameters the adapter stores (``modules_to_save``, trained
  biases, embeddings saved because they were targeted or resized), which replace the base's.

The arithmetic follows ``peft/tuners/lora/layer.py`` and ``variants.py`` (peft 0.21):
delta = (B @ A) * scale, transposed under ``fan_in_fan_out``; an embedding's delta is
(B @ A).T * scale; DoRA rescales each output row (embeddings: each hidden column) of
V = W + delta to the learned magnitude.  Everything is computed in float32 and the caller
casts once.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ClawError
from ..io.pipeline import in_two_halves
from ..io.readers import TensorStore, open_tensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."

# The parts of a LoRA module as PEFT saves them (key with the PEFT prefix removed).
LORA_PARTS = (
    (re.compile(r"^(?P<module>.+)\.lora_A\.weight$"), "a"),
    (re.compile(r"^(?P<module>.+)\.lora_B\.weight$"), "b"),
    (re.compile(r"^(?P<module>.+)\.lora_B\.bias$"), "b_bias"),                 # lora_bias=True
    (re.compile(r"^(?P<module>.+)\.lora_embedding_A$"), "a"),                  # nn.Embedding targets
    (re.compile(r"^(?P<module>.+)\.lora_embedding_B$"), "b"),
    (re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.weight)?$"), "magnitude"),  # DoRA; '.weight' in peft < 0.14
)
EMBEDDING_PARTS = ("lora_embedding_A", "lora_embedding_B")

# Adapter options whose meaning is not "add a low-rank delta": refused, never guessed.
UNSUPPORTED_OPTIONS = {
    "layer_replication": "it duplicates base layers",
    "target_parameters": "it targets bare nn.Parameters (MoE experts)",
    "trainable_token_indices": "it trains single token rows (TrainableTokens), not LoRA factors",
    "alora_invocation_tokens": "activated LoRA only applies after its invocation tokens, which a merge cannot express",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routes between several adapters at run time",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA truncates the base weight's singular values",
    "use_qalora": "QALoRA pools its inputs",
}
# init_lora_weights values that also rewrite the base weights: the adapter only fits that
# modified base unless it was saved with `path_initial_model_for_weight_conversion`.
BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")



def match_pattern(patterns: dict, module_path: str):
    """PEFT's ``get_pattern_key``: the first key K with ``(.*\\.)?(K)$`` matching the path."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_path):
            return key
    return None


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of ``adapter_config.json`` a merge depends on."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    fan_in_fan_out: bool = False
    use_dora: bool = False
    lora_bias: bool = False
    modules_to_save: tuple[str, ...] = ()
    ensure_weight_tying: bool = False

    def rank_alpha(self, module_path: str) -> tuple[int, float]:
        r_key = match_pattern(self.rank_pattern, module_path)
        a_key = match_pattern(self.alpha_pattern, module_path)
        r = self.rank_pattern[r_key] if r_key is not None else self.r
        alpha = self.alpha_pattern[a_key] if a_key is not None else self.lora_alpha
        return int(r), float(alpha)

    def scale(self, module_path: str) -> float:
        """alpha / r, or alpha / sqrt(r) with rslora (``LoraLayer.update_layer``)."""
        r, alpha = self.rank_alpha(module_path)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def saves_module(self, module_path: str) -> bool:
        """``modules_to_save`` matching as PEFT's ``_set_trainable`` does it (plain suffix)."""
        return any(module_path.endswith(name) for name in self.modules_to_save)


def read_adapter_config(path: Path) -> tuple[AdapterConfig, dict]:
    file = Path(path) / ADAPTER_CONFIG
    if not file.is_file():
        raise ClawError(f"{path}: no {ADAPTER_CONFIG} (not a PEFT adapter directory)")
    try:
        raw = json.loads(file.read_text())
        assert isinstance(raw, dict)
    except Exception as e:
        raise ClawError(f"{file}: not valid JSON ({e.__class__.__name__})") from e
    peft_type = str(raw.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ClawError(f"{file}: peft_type is {peft_type}; merge-lora merges LoRA (and DoRA) adapters only")
    for option, why in UNSUPPORTED_OPTIONS.items():
        if raw.get(option):
            raise ClawError(f"{file}: '{option}' is set; cannot merge: {why}")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_MODIFYING_INITS):
        raise ClawError(f"{file}: init_lora_weights='{init}' also rewrote the base weights during training; "
                        f"re-save the adapter with peft's path_initial_model_for_weight_conversion first")
    try:
        config = AdapterConfig(
            r=int(raw["r"]), lora_alpha=float(raw.get("lora_alpha", 8)),
            use_rslora=bool(raw.get("use_rslora", False)),
            rank_pattern=dict(raw.get("rank_pattern") or {}), alpha_pattern=dict(raw.get("alpha_pattern") or {}),
            fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
            use_dora=bool(raw.get("use_dora", False)), lora_bias=bool(raw.get("lora_bias", False)),
            modules_to_save=tuple(raw.get("modules_to_save") or ()),
            ensure_weight_tying=bool(raw.get("ensure_weight_tying", False)))
    except (KeyError, TypeError, ValueError) as e:
        raise ClawError(f"{file}: missing or invalid field ({e})") from e
    if config.use_dora and config.lora_bias:
        raise ClawError(f"{file}: use_dora and lora_bias together are not a valid PEFT adapter")
    return config, raw


@dataclass
class LoraModule:
    """One targeted module: adapter keys of its factors and how PEFT scales them."""

    path: str                 # module path as the adapter names it (PEFT prefix removed)
    kind: str                 # "linear" or "embedding"
    a: str                    # adapter key of A: (r, in) / embedding (r, vocab)
    b: str                    # adapter key of B: (out, r) / embedding (hidden, r)
    scale: float
    r: int
    b_bias: str | None = None
    magnitude: str | None = None


class Adapter:
    """An opened PEFT adapter: config, LoRA modules by path, full tensors by parameter path."""

    def __init__(self, path: str | Path, unsafe_pickle: bool = False):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ClawError(f"{self.path}: not a directory (expected a PEFT adapter directory)")
        self.config, self.raw_config = read_adapter_config(self.path)
        self.store: TensorStore = open_tensors(self.path, unsafe_pickle=unsafe_pickle, prefer=ADAPTER_WEIGHTS)
        self.modules: dict[str, LoraModule] = {}
        self.full: dict[str, str] = {}          # parameter path -> adapter key
        self.shared: set[str] = set()           # parameter paths saved from a base layer (shared by ties)
        self._group()

    @classmethod
    def none(cls, path: str | Path) -> "Adapter":
        """No adapter at all: a conversion through the merge machinery (original LLaVA -> llava-hf)."""
        self = cls.__new__(cls)
        self.path = Path(path)
        self.config, self.raw_config = AdapterConfig(r=1, lora_alpha=1.0), None
        self.store = TensorStore(self.path)
        self.modules, self.full, self.shared = {}, {}, set()
        return self

    def _group(self) -> None:
        parts: dict[str, dict[str, str]] = {}
        for key in self.store.keys():
            name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            for pattern, part in LORA_PARTS:
                m = pattern.match(name)
                if m:
                    parts.setdefault(m["module"], {})[part] = key
                    if any(p in name for p in EMBEDDING_PARTS):
                        parts[m["module"]]["embedding"] = key
                    break
            else:
                if ".base_layer." in name:   # a targeted module's own parameter, e.g. resized embeddings
                    name = name.replace(".base_layer.", ".")
                    self.shared.add(name)
                elif not self.config.saves_module(name.rsplit(".", 1)[0]):
                    self.shared.add(name)    # trained bias ("all"), or a resized untargeted embedding
                if name in self.full:
                    raise ClawError(f"{self.path}: tensors '{self.full[name]}' and '{key}' both hold '{name}'")
                self.full[name] = key
        for path, p in parts.items():
            if "a" not in p or "b" not in p:
                have = ", ".join(sorted(p))
                raise ClawError(f"{self.path}: LoRA module '{path}' is incomplete (has only {have})")
            if ("magnitude" in p) != self.config.use_dora:
                raise ClawError(f"{self.path}: module '{path}' "
                                + ("has a DoRA magnitude but use_dora is false" if "magnitude" in p
                                   else "has no lora_magnitude_vector but use_dora is true"))
            r, _ = self.config.rank_alpha(path)
            kind = "embedding" if "embedding" in p else "linear"
            a_shape = self.store.info(p["a"]).shape
            if len(a_shape) != 2 or a_shape[0] != r:
                raise ClawError(f"{self.path}: '{p['a']}' has shape {a_shape} but adapter_config gives "
                                f"'{path}' rank {r}")
            self.modules[path] = LoraModule(path, kind, p["a"], p["b"], self.config.scale(path), r,
                                            p.get("b_bias"), p.get("magnitude"))

    def read(self, key: str) -> np.ndarray:
        return np.asarray(self.store.read(key), dtype=np.float32)

    def check_fits(self, module: LoraModule, weight_shape: tuple[int, ...], fan_in_fan_out: bool,
                   base_name: str) -> None:
        """Raise, naming the tensor, when the factors cannot be applied to a base weight of this shape."""
        a, b = self.store.info(module.a).shape, self.store.info(module.b).shape
        if len(weight_shape) != 2:
            raise ClawError(f"adapter module '{module.path}' targets '{base_name}', which is not a matrix "
                            f"(shape {weight_shape})")
        if module.kind == "embedding":
            rows, cols = weight_shape                      # (vocab, hidden)
            want_a, want_b = (module.r, rows), (cols, module.r)
        else:
            out, inp = weight_shape[::-1] if fan_in_fan_out else weight_shape
            want_a, want_b = (module.r, inp), (out, module.r)
        for key, have, want in ((module.a, a, want_a), (module.b, b, want_b)):
            if tuple(have) != want:
                raise ClawError(f"adapter tensor '{key}' has shape {tuple(have)}, but base '{base_name}' "
                                f"{tuple(weight_shape)} needs {want}")
        if module.magnitude:
            m = tuple(self.store.info(module.magnitude).shape)
            n = (weight_shape[1],) if module.kind == "embedding" else (want_b[0],)
            if m != n:
                raise ClawError(f"adapter tensor '{module.magnitude}' has shape {m}, but base '{base_name}' "
                                f"{tuple(weight_shape)} needs {n}")

    def close(self) -> None:
        self.store.close()


def layer_fan_in_fan_out(adapter: Adapter, module: LoraModule, weight_shape: tuple[int, ...],
                         conv1d: bool) -> bool:
    """Whether this layer stores its weight (in, out), as PEFT decides it per layer.

    PEFT overrides the config's ``fan_in_fan_out`` by layer class (``nn.Linear``: False,
    ``Conv1D``: True; ``_create_new_module`` warns and flips it), so the flag is read from the
    weight's shape against the factors', and only a square weight falls back on the class the
    architecture uses (``conv1d``: its table row says its projections are transformers' Conv1D).
    """
    if module.kind == "embedding":
        return False
    inp, out = adapter.store.info(module.a).shape[1], adapter.store.info(module.b).shape[0]
    if inp != out and tuple(weight_shape) in ((out, inp), (inp, out)):
        return tuple(weight_shape) == (inp, out)
    return conv1d


def merge_into(weight: np.ndarray, adapter: Adapter, module: LoraModule, fan_in_fan_out: bool) -> np.ndarray:
    """Return float32 ``weight`` with the module's delta merged in, as PEFT's ``merge`` does.

    ``weight`` must already be float32; it is updated in place where that saves memory.
    """
    a, b = adapter.read(module.a), adapter.read(module.b)
    if module.kind == "embedding":
        delta = b @ a
        delta *= module.scale
        weight += delta.T                                     # Embedding.get_delta_weight: (b @ a).T * scale
        del delta
        if module.magnitude:                                  # DoraEmbeddingVariant: per hidden column
            weight *= (adapter.read(module.magnitude) / np.linalg.norm(weight, axis=0)).reshape(1, -1)
        return weight
    delta = b @ a                                             # Linear.get_delta_weight, (out, in)
    delta *= module.scale
    v = weight.T if fan_in_fan_out else weight               # a view: (out, in)
    v += delta
    del delta
    if module.magnitude:                                      # DoraLinearVariant: per output row
        v *= (adapter.read(module.magnitude) / np.linalg.norm(v, axis=1)).reshape(-1, 1)
    return weight


BAND_BYTES = 1 << 20   # float32 rows merged at a time: the band stays in cache from matmul to cast


def merged_linear(weight: np.ndarray, adapter: Adapter, module: LoraModule, out_dtype: np.dtype) -> np.ndarray:
    """``weight + scale * (B @ A)`` for a plain Linear LoRA (no DoRA, weight (out, in)), made
    a band of rows at a time and returned in ``out_dtype`` (:class:`LinearMerge` writes the same
    rows straight into a caller's buffer instead)."""
    merge = LinearMerge(lambda i, j: weight[i:j], weight.shape, adapter.read(module.a), adapter.read(module.b),
                        module.scale)
    out = np.empty(weight.shape, out_dtype)
    merge.fill(out, 0, weight.shape[0])
    return out


class LinearMerge:
    """A plain Linear LoRA merge, computed a band of rows at a time into whatever buffer the
    caller hands over (``fill(dest, first, last)``: rows ``[first, last)``).

    The same float32 arithmetic as :func:`merge_into` (PEFT's ``get_delta_weight``: the
    product, then the scale, then the sum), but each band is cast in, merged and cast out while
    it is in cache, instead of four passes over a float32 copy of the whole matrix; ``rows(i, j)``
    gives the base weight's rows (a slice, or a read of just those bytes), so neither the base
    weight nor the merged one need be whole in memory.  A large range's second half of rows is
    merged on the helper thread meanwhile."""

    def __init__(self, rows: Callable[[int, int], np.ndarray], shape: tuple[int, ...], a: np.ndarray,
                 b: np.ndarray, scale: float, done: Callable[[int, int], None] | None = None):
        self.rows, self.shape, self.a, self.b, self.scale = rows, tuple(shape), a, b, scale
        self.done = done                 # rows(i, j) will not be asked for again: let them go
        self.band = max(8, min(self.shape[0], BAND_BYTES // max(1, self.shape[1] * 4)))

    def fill(self, dest: np.ndarray, first: int, last: int) -> None:
        def merge(lo: int, hi: int) -> None:
            _merge_rows(self.rows, self.a, self.b, self.scale, dest, self.band, first + lo, first + hi, first,
                        self.done)
        in_two_halves(merge, last - first, self.band, (last - first) * self.shape[1] * 4)


def _merge_rows(rows: Callable[[int, int], np.ndarray], a: np.ndarray, b: np.ndarray, scale: float,
                out: np.ndarray, band_rows: int, first: int, last: int, origin: int,
                done: Callable[[int, int], None] | None = None) -> None:
    """Rows ``[first, last)`` of the merge into ``out``, whose row 0 is row ``origin``."""
    cols = a.shape[1]
    band = np.empty((band_rows, cols), np.float32)
    delta = np.empty((band_rows, cols), np.float32)
    for i in range(first, last, band_rows):
        j = min(i + band_rows, last)
        x, d = band[:j - i], delta[:j - i]
        np.matmul(b[i:j], a, out=d)
        d *= scale
        x[...] = rows(i, j)           # to float32
        if done is not None:
            done(i, j)
        x += d
        out[i - origin:j - origin] = x   # to the output dtype, rounding to nearest even


def bias_delta(adapter: Adapter, module: LoraModule) -> np.ndarray:
    """lora_bias=True: the base bias gains ``lora_B.bias * scale`` (``Linear.merge``)."""
    return adapter.read(module.b_bias) * module.scale


def same_factors(embedding: LoraModule, head: LoraModule, adapter: Adapter) -> bool:
    """True when a Linear head's LoRA is the input embedding's, transposed, at the same scale.

    That is how peft ties them under ``ensure_weight_tying`` (lm_head A = embedding B.T and
    B = embedding A.T), so both sides carry the same delta.
    """
    if (embedding.kind, head.kind) != ("embedding", "linear") or embedding.scale != head.scale:
        return False
    if embedding.magnitude or head.magnitude or head.b_bias:
        return False
    return (np.array_equal(adapter.read(head.a), adapter.read(embedding.b).T)
            and np.array_equal(adapter.read(head.b), adapter.read(embedding.a).T))
