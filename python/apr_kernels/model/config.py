"""Model configurations as data: the ``ModelConfig`` dataclass, named presets, and the mapping to and
from the typed APR metadata (``apr_kernels.metadata.AprModelConfig``).

Four dense families share one code path: Llama (no attention bias), Mistral (Llama with a sliding
attention window), Qwen2 (bias on q/k/v only) and Qwen3 (no bias; an RMSNorm over each head of q and
k before RoPE). Their mixture-of-experts relatives keep the attention of their base family and replace
the MLP of (some) layers with routed experts: Qwen2-MoE (Qwen2 attention, top-k experts plus a gated
shared expert), Qwen3-MoE (Qwen3 attention, top-k experts) and Mixtral (Mistral attention, top-2 of 8).
A config says which through ``architecture``; everything else is plain numbers.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

# architecture family -> Hugging Face class name (the APR `hf_architecture` key)
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                    "qwen3": "Qwen3ForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                    "qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM"}
# mixture-of-experts family -> the dense family whose attention (and everything but the MLP) it shares
MOE_FAMILIES = {"qwen2_moe": "qwen2", "qwen3_moe": "qwen3", "mixtral": "mistral"}
DECODER_FAMILIES = tuple(HF_ARCHITECTURES)
FAMILY_NAMES = "llama, mistral, qwen2, qwen3, qwen2_moe, qwen3_moe or mixtral"
# substrings that mark an encoder (bidirectional) model: never a causal-LM init
ENCODER_MARKERS = ("bert", "roberta", "electra", "deberta", "encoder", "t5", "bart", "xlm")


@dataclass
class ModelConfig:
    """Shape and numerics of a decoder-only Llama/Qwen2 transformer.

    ``head_dim`` defaults to ``hidden_size // num_heads``. ``rope_type`` 2 rotates split halves
    (Hugging Face ``rotate_half``), 0 rotates adjacent pairs (llama.cpp-ordered q/k rows).
    ``attention_bias`` is the Qwen2 q/k/v bias. With ``tie_word_embeddings`` the output projection is
    the embedding matrix and no ``lm_head.weight`` parameter exists. ``qk_norm`` (Qwen3): q and k are
    RMS-normalised per head (weights ``q_norm``/``k_norm`` of head_dim) before RoPE. ``sliding_window``
    (Mistral; Qwen2/3 with ``use_sliding_window``): each token attends to itself and the
    ``sliding_window - 1`` tokens before it, in every layer, or with ``max_window_layers`` = k in the
    layers from k on (the first k attend to everything, as Hugging Face's Qwen2/3); None: no window.
    """

    architecture: str = "llama"
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    num_kv_heads: int = 4
    intermediate_size: int = 2816
    vocab_size: int = 50257
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_type: int = 2
    rope_scaling: dict | None = None  # Hugging Face rope_scaling: None, "linear", "llama3", "yarn", "dynamic" (rope.py)
    rms_norm_eps: float = 1e-5
    attention_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = True
    sliding_window: int | None = None
    max_window_layers: int | None = None
    # a sequence classifier (a reward model: 1): ``score`` [num_labels, hidden] on each sequence's last
    # hidden state instead of the output projection, as Hugging Face's *ForSequenceClassification
    num_labels: int | None = None
    # mixture of experts (the MoE families only; Hugging Face's config.json names and defaults)
    num_experts: int | None = None
    num_experts_per_tok: int | None = None
    moe_intermediate_size: int | None = None
    shared_expert_intermediate_size: int | None = None
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple = ()
    router_aux_loss_coef: float = 0.001
    # where the numbers came from, for error messages only (not part of equality or to_dict)
    _source: str = dataclasses.field(default="ModelConfig", repr=False, compare=False)

    def __post_init__(self):
        self.architecture = str(self.architecture).lower()
        if self.head_dim is None and self.num_heads:
            self.head_dim = self.hidden_size // self.num_heads
        if self.architecture == "mixtral":  # Mixtral's experts are intermediate_size wide, renormalised
            if self.moe_intermediate_size is None:
                self.moe_intermediate_size = self.intermediate_size
            self.norm_topk_prob = True
        self.mlp_only_layers = tuple(self.mlp_only_layers or ())
        self.validate(self._source)

    def validate(self, source: str = "ModelConfig") -> None:
        """Raise ValueError naming the field when the numbers cannot describe a model."""
        if self.architecture not in DECODER_FAMILIES:
            raise ValueError(f"{source}: architecture={self.architecture!r}; expected one of "
                             f"{', '.join(DECODER_FAMILIES)} (decoder-only Llama/Mistral/Qwen2/Qwen3 families "
                             f"and their mixture-of-experts relatives)")
        self._validate_experts(source)
        w = self.sliding_window
        if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w <= 0):
            raise ValueError(f"{source}: sliding_window={w!r}; expected a positive integer (keys each token "
                             f"attends to) or None")
        n = self.num_labels
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n <= 0):
            raise ValueError(f"{source}: num_labels={n!r}; expected a positive integer (a sequence classifier's "
                             f"scores; 1 for a reward model) or None (a causal LM)")
        k = self.max_window_layers
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 0):
            raise ValueError(f"{source}: max_window_layers={k!r}; expected a non-negative integer (the first "
                             f"layers, without a window) or None")
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                     "vocab_size", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{source}: {name}={value!r}; expected a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{source}: num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads} (grouped-query attention needs it)")
        if self.head_dim % 2:
            raise ValueError(f"{source}: head_dim={self.head_dim}; expected an even number (RoPE pairs)")
        if self.rope_type not in (0, 2):
            raise ValueError(f"{source}: rope_type={self.rope_type!r}; expected 0 (adjacent pairs) "
                             f"or 2 (split halves)")
        from .rope import check_rope_scaling

        self.rope_scaling = check_rope_scaling(self.rope_scaling, source, self.max_position_embeddings)
        if not (self.rope_theta > 0 and self.rms_norm_eps > 0):
            raise ValueError(f"{source}: rope_theta={self.rope_theta}, rms_norm_eps={self.rms_norm_eps}; "
                             f"expected both > 0")

    def _validate_experts(self, source: str) -> None:
        def positive(name):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{source}: {name}={value!r}; expected a positive integer for a "
                                 f"{self.architecture} (mixture-of-experts) model")

        fields = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size")
        if not self.is_moe:
            given = [f"{n}={getattr(self, n)}" for n in fields if getattr(self, n)]
            if given:
                raise ValueError(f"{source}: {', '.join(given)} given for architecture={self.architecture!r}, a "
                                 f"dense model; expected a mixture-of-experts family ({', '.join(MOE_FAMILIES)})")
            return
        for name in fields[:3] + (("shared_expert_intermediate_size",) if self.architecture == "qwen2_moe" else ()):
            positive(name)
        if self.architecture != "qwen2_moe" and self.shared_expert_intermediate_size:
            raise ValueError(f"{source}: shared_expert_intermediate_size={self.shared_expert_intermediate_size} "
                             f"for {self.architecture}; only qwen2_moe models have a shared expert")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"{source}: num_experts_per_tok={self.num_experts_per_tok} exceeds num_experts="
                             f"{self.num_experts}; expected at most one choice per expert")
        positive("decoder_sparse_step")
        if self.architecture == "mixtral":  # what transformers' Mixtral can hold (export and oracle alike)
            odd = [f"{k}={v!r}" for k, v, plain in (
                ("moe_intermediate_size", self.moe_intermediate_size, self.intermediate_size),
                ("decoder_sparse_step", self.decoder_sparse_step, 1),
                ("mlp_only_layers", list(self.mlp_only_layers), [])) if v != plain]
            if odd:
                raise ValueError(f"{source}: {', '.join(odd)} for mixtral; expected every layer sparse with experts "
                                 f"intermediate_size ({self.intermediate_size}) wide, as Mixtral has")
        if self.architecture in ("mixtral", "qwen3_moe") and self.max_window_layers is not None:
            raise ValueError(f"{source}: max_window_layers={self.max_window_layers} for {self.architecture}; its "
                             f"sliding window (if any) covers every layer")
        bad = [i for i in self.mlp_only_layers if not isinstance(i, int) or isinstance(i, bool) or i < 0]
        if bad:
            raise ValueError(f"{source}: mlp_only_layers={list(self.mlp_only_layers)}; expected layer indices >= 0")
        c = self.router_aux_loss_coef
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 <= c < math.inf:
            raise ValueError(f"{source}: router_aux_loss_coef={c!r}; expected a finite number >= 0")

    # ------------------------------------------------------------------------------------ derived
    @property
    def is_moe(self) -> bool:
        """A mixture-of-experts family (qwen2_moe, qwen3_moe, mixtral)."""
        return self.architecture in MOE_FAMILIES

    @property
    def base_family(self) -> str:
        """The dense family whose attention this model has (itself for a dense model)."""
        return MOE_FAMILIES.get(self.architecture, self.architecture)

    @property
    def ffn_name(self) -> str:
        """The attribute (and Hugging Face name part) of each layer's MLP: Mixtral's
        ``block_sparse_moe``, everyone else's ``mlp``."""
        return "block_sparse_moe" if self.architecture == "mixtral" else "mlp"

    def moe_layer(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` routes its tokens to experts (Hugging Face's rule)."""
        return (self.is_moe and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    def _ffn_parameters(self, layer: int, active: bool) -> int:
        """Weights of layer ``layer``'s MLP (``active``: those one token is multiplied with)."""
        h = self.hidden_size
        if not self.moe_layer(layer):
            return 3 * h * self.intermediate_size
        experts = self.num_experts_per_tok if active else self.num_experts
        n = self.num_experts * h + experts * 3 * h * self.moe_intermediate_size
        if self.shared_expert_intermediate_size:
            n += 3 * h * self.shared_expert_intermediate_size + h
        return n

    def layer_window(self, layer: int) -> int | None:
        """The attention window of decoder layer ``layer`` (None: it attends to every earlier token)."""
        if self.sliding_window is None or (self.max_window_layers is not None and layer < self.max_window_layers):
            return None
        return self.sliding_window

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head (7 for Qwen2-0.5B)."""
        return self.num_heads // self.num_kv_heads

    @property
    def hf_architecture(self) -> str:
        name = HF_ARCHITECTURES[self.architecture]
        return name.replace("ForCausalLM", "ForSequenceClassification") if self.num_labels else name

    @property
    def has_lm_head(self) -> bool:
        """Whether an ``lm_head.weight`` parameter exists (an untied causal LM)."""
        return not self.num_labels and not self.tie_word_embeddings

    def replace(self, **changes) -> "ModelConfig":
        if "hidden_size" in changes or "num_heads" in changes:
            changes.setdefault("head_dim", None)  # re-derive unless given
        return dataclasses.replace(self, **changes)

    def with_context(self, *, rope_theta: float | None = None, rope_scaling: str | dict | None = None,
                     max_position_embeddings: int | None = None, where: str = "context") -> "ModelConfig":
        """This config for a longer context (continued training at longer sequences): a new RoPE base
        (``rope_theta``, "adjusted base frequency"), a frequency scaling (``rope_scaling``: a dict or
        ``rope.parse_rope_scaling``'s ``KIND:FACTOR``/JSON, scaling from the current
        ``max_position_embeddings``; ``"none"`` removes one), and the new limit, by default the
        current one times the scaling factor. The weights are untouched; only the positions' rotations
        and the limit change."""
        from .rope import check_rope_scaling, parse_rope_scaling

        changes: dict = {}
        if rope_theta is not None:
            if isinstance(rope_theta, bool) or not isinstance(rope_theta, (int, float)) or not rope_theta > 0:
                raise ValueError(f"{where}: --rope-theta {rope_theta!r}; expected a positive number")
            changes["rope_theta"] = float(rope_theta)
        if rope_scaling is not None:
            # (llama3/yarn scale from the current limit unless the spec names its own)
            scaling = (parse_rope_scaling(rope_scaling, self.max_position_embeddings, f"{where}: --rope-scaling")
                       if isinstance(rope_scaling, str) else
                       check_rope_scaling(rope_scaling, f"{where}: rope_scaling", self.max_position_embeddings))
            changes["rope_scaling"] = scaling
            if scaling and max_position_embeddings is None:
                base = scaling.get("original_max_position_embeddings", self.max_position_embeddings)
                max_position_embeddings = int(base * scaling["factor"])
        if max_position_embeddings is not None:
            if isinstance(max_position_embeddings, bool) or not isinstance(max_position_embeddings, int) \
                    or max_position_embeddings < 1:
                raise ValueError(f"{where}: --max-position-embeddings {max_position_embeddings!r}; expected a "
                                 f"positive integer")
            changes["max_position_embeddings"] = max_position_embeddings
        return self.replace(**changes) if changes else self

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.compare}

    def num_parameters(self, *, include_embedding: bool = True) -> int:
        """Trainable parameter count (the tied output projection counted once)."""
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.attention_bias else 0) + (2 * d if self.qk_norm else 0)
        n = sum(attn + self._ffn_parameters(i, active=False) + 2 * h for i in range(self.num_layers)) + h
        if self.num_labels:
            n += self.num_labels * h
        if include_embedding:
            n += self.vocab_size * h * (2 if self.has_lm_head else 1)
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x (matmul parameters) plus causal attention scores.

        Matmul parameters are every weight matrix a token is multiplied with, including the output
        projection (once, even if tied) and excluding the embedding lookup; of a mixture-of-experts
        layer, the router, the token's top-k experts and a shared expert. Attention: per layer,
        QK^T and PV are 2 x 2 x S x (Hq x D) FLOPs per token in the forward pass, halved by
        the causal mask, times 3 for forward + backward.
        """
        h, q = self.hidden_size, self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h
        matmul_params = (sum(attn + self._ffn_parameters(i, active=True) for i in range(self.num_layers))
                         + (self.num_labels or self.vocab_size) * h)
        attn_forward = self.num_layers * 2 * 2 * seq_len * q * 0.5
        attn = 3 * attn_forward
        return 6.0 * matmul_params + attn

    # ---------------------------------------------------------------------------- APR metadata
    def to_apr_config(self):
        """The typed APR metadata (``AprModelConfig``) that describes this model."""
        from apr_kernels.metadata import AprModelConfig

        return AprModelConfig(
            architecture=self.architecture,
            hf_architecture=self.hf_architecture,
            model_type=self.architecture,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            vocab_size=self.vocab_size,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings,
            rope_theta=float(self.rope_theta),
            rope_type=self.rope_type,
            rms_norm_eps=float(self.rms_norm_eps),
            head_dim=self.head_dim,
            tied_embeddings=self.tie_word_embeddings,
            rope_scaling=dict(self.rope_scaling) if self.rope_scaling else None,
            sliding_window=self.sliding_window,
            max_window_layers=self.max_window_layers,
            num_labels=self.num_labels,
            **self._apr_expert_keys(),
        )

    def _apr_expert_keys(self) -> dict:
        if not self.is_moe:
            return {}
        keys = {"num_experts": self.num_experts, "num_experts_per_tok": self.num_experts_per_tok,
                "moe_intermediate_size": self.moe_intermediate_size,
                "router_aux_loss_coef": float(self.router_aux_loss_coef)}
        if self.architecture != "mixtral":
            keys.update(norm_topk_prob=self.norm_topk_prob, decoder_sparse_step=self.decoder_sparse_step,
                        mlp_only_layers=list(self.mlp_only_layers),
                        shared_expert_intermediate_size=self.shared_expert_intermediate_size)
        return keys

    @classmethod
    def from_apr_config(cls, apr, path=None) -> "ModelConfig":
        """Build from typed APR metadata, as aprender's ``from_apr_metadata`` does.

        Required: hidden_size, num_heads, num_layers, vocab_size, intermediate_size. Defaults when
        missing: num_kv_heads = num_heads, max_position_embeddings 32768, rms_norm_eps 1e-6,
        rope_theta 10000, rope_type 2 (Hugging Face row order, what safetensors imports keep),
        tied unless ``tied_embeddings`` says false (``from_apr`` refines tying and bias from the
        tensors actually present). Encoders (BERT, RoBERTa, ...) are refused here.
        """
        where = f"{path}: " if path else ""
        family = family_of(apr, path)
        missing = [k for k in ("hidden_size", "num_heads", "num_layers", "vocab_size", "intermediate_size")
                   if getattr(apr, k, None) is None]
        if missing:
            raise ValueError(f"{where}metadata lacks {', '.join(missing)}; expected integer model "
                             f"dimensions (APR typed keys, spec section 5.2)")
        tied = getattr(apr, "tied_embeddings", None)
        cfg = cls(
            architecture=family,
            hidden_size=int(apr.hidden_size),
            num_layers=int(apr.num_layers),
            num_heads=int(apr.num_heads),
            num_kv_heads=int(apr.num_kv_heads if apr.num_kv_heads is not None else apr.num_heads),
            intermediate_size=int(apr.intermediate_size),
            vocab_size=int(apr.vocab_size),
            head_dim=int(apr.head_dim) if getattr(apr, "head_dim", None) else None,
            max_position_embeddings=int(apr.max_position_embeddings or 32768),
            rope_theta=float(apr.rope_theta if apr.rope_theta is not None else 10000.0),
            rope_type=int(apr.rope_type if apr.rope_type is not None else 2),
            rope_scaling=getattr(apr, "rope_scaling", None),
            rms_norm_eps=float(apr.rms_norm_eps if apr.rms_norm_eps is not None else 1e-6),
            attention_bias=MOE_FAMILIES.get(family, family) == "qwen2",
            qk_norm=MOE_FAMILIES.get(family, family) == "qwen3",
            tie_word_embeddings=True if tied is None else bool(tied),
            sliding_window=getattr(apr, "sliding_window", None),
            max_window_layers=getattr(apr, "max_window_layers", None),
            num_labels=getattr(apr, "num_labels", None),
            **_expert_settings(apr, family),
            _source=f"{path or 'APR metadata'}",
        )
        return cfg


def _expert_settings(apr, family: str) -> dict:
    """The ModelConfig keywords of a mixture-of-experts family from APR metadata (Hugging Face's
    defaults for the keys a file leaves out); for a dense family, whatever the file says, so that a
    dense model with expert keys is refused by name."""
    keys = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
            "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef")
    out = {k: getattr(apr, k, None) for k in keys}
    return {k: (tuple(v) if k == "mlp_only_layers" else v) for k, v in out.items() if v is not None}


def family_of(apr, path=None) -> str:
    """The decoder family (``DECODER_FAMILIES``) named by APR metadata, or a ValueError.

    Looks at ``architecture``, then ``model_type``, then ``hf_architecture``; GGUF's spellings of the
    mixture-of-experts families (``qwen2moe``, ``qwen3moe``) are accepted. Encoders are refused
    with a message that says decoder-only models are required.
    """
    where = f"{path}: " if path else ""
    names = {k: getattr(apr, k, None) for k in ("architecture", "model_type", "hf_architecture")}
    text = " ".join(str(v).lower() for v in names.values() if v)
    shown = ", ".join(f"{k}={v!r}" for k, v in names.items() if v) or "no architecture keys"
    if any(m in text for m in ENCODER_MARKERS):
        raise ValueError(f"{where}architecture family mismatch: {shown} is an encoder model; "
                         f"expected a decoder-only causal LM ({FAMILY_NAMES})")
    for key in ("architecture", "model_type", "hf_architecture"):
        value = str(names[key] or "").lower()
        if not value:
            continue
        squashed = value.replace("_", "").replace("-", "")
        for family in MOE_FAMILIES:  # before the dense names they start with
            if squashed.startswith(family.replace("_", "")):
                return family
        for family in DECODER_FAMILIES:
            if value.startswith(family) and "moe" not in value:  # other mixture-of-experts kinds: not these
                return family
        raise ValueError(f"{where}unsupported architecture family: {shown}; expected a decoder-only "
                         f"{FAMILY_NAMES} model")
    raise ValueError(f"{where}metadata has no architecture, model_type or hf_architecture key; "
                     f"expected {FAMILY_NAMES}")


def pad_vocab(n: int, multiple: int = 64) -> int:
    """Round a tokenizer vocabulary up to a matmul-friendly model vocabulary."""
    return int(math.ceil(n / multiple) * multiple)


PRESETS: dict[str, ModelConfig] = {
    # aprender's from-scratch baseline (MODEL-2 plan); the default without --init or --preset
    "llama_370m": ModelConfig(
        architecture="llama", hidden_size=1024, num_layers=24, num_heads=16, num_kv_heads=4,
        intermediate_size=2816, vocab_size=50257, max_position_embeddings=4096, rope_theta=1e4,
        rms_norm_eps=1e-5, attention_bias=False, tie_word_embeddings=True),
    # Qwen2.5(-Coder)-0.5B: GQA 7:1, q/k/v bias, tied
    "qwen2_0_5b": ModelConfig(
        architecture="qwen2", hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64,
        intermediate_size=4864, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
        rms_norm_eps=1e-6, attention_bias=True, tie_word_embeddings=True),
    # the demo: Qwen2-shaped (GQA 7:1, bias), small body, the full Qwen2.5 tokenizer vocabulary
    # (151665 padded to a multiple of 64) so it pairs with Tokenizer.qwen2(); head_dim 16 is the
    # smallest the attention kernel takes
    "qwen2_demo": ModelConfig(
        architecture="qwen2", hidden_size=112, num_layers=2, num_heads=7, num_kv_heads=1, head_dim=16,
        intermediate_size=304, vocab_size=151680, max_position_embeddings=2048, rope_theta=1e4,
        rms_norm_eps=1e-6, attention_bias=True, tie_word_embeddings=True),
    # tiny test shapes (odd sizes on purpose)
    # Qwen3-0.6B: GQA 2:1, head_dim 128 (explicit: 16 x 128 > hidden), q/k norms, no bias, tied
    "qwen3_0_6b": ModelConfig(
        architecture="qwen3", hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
        intermediate_size=3072, vocab_size=151936, max_position_embeddings=40960, rope_theta=1e6,
        rms_norm_eps=1e-6, attention_bias=False, qk_norm=True, tie_word_embeddings=True),
    "tiny_llama": ModelConfig(
        architecture="llama", hidden_size=48, num_layers=2, num_heads=6, num_kv_heads=2,
        intermediate_size=104, vocab_size=320, max_position_embeddings=512, rope_theta=1e4,
        rms_norm_eps=1e-5, attention_bias=False, tie_word_embeddings=True),
    "tiny_qwen2": ModelConfig(
        architecture="qwen2", hidden_size=56, num_layers=2, num_heads=7, num_kv_heads=1,
        intermediate_size=88, vocab_size=320, max_position_embeddings=512, rope_theta=1e6,
        rms_norm_eps=1e-6, attention_bias=True, tie_word_embeddings=True),
    # published mixture-of-experts shapes (bench_train --preset NAME --layers N; from-scratch configs)
    # Qwen3-30B-A3B: 128 experts, 8 per token, q/k norms, untied
    "qwen3_30b_a3b": ModelConfig(
        architecture="qwen3_moe", hidden_size=2048, num_layers=48, num_heads=32, num_kv_heads=4, head_dim=128,
        intermediate_size=6144, vocab_size=151936, max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6,
        qk_norm=True, tie_word_embeddings=False, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
        norm_topk_prob=True),
    # Qwen1.5-MoE-A2.7B (Qwen2-MoE): 60 experts, 4 per token, a gated shared expert, q/k/v bias
    "qwen2_moe_a2_7b": ModelConfig(
        architecture="qwen2_moe", hidden_size=2048, num_layers=24, num_heads=16, num_kv_heads=16,
        intermediate_size=5632, vocab_size=151936, max_position_embeddings=8192, rope_theta=1e6, rms_norm_eps=1e-6,
        attention_bias=True, tie_word_embeddings=False, num_experts=60, num_experts_per_tok=4,
        moe_intermediate_size=1408, shared_expert_intermediate_size=5632),
    # Mixtral-8x7B: 8 experts, 2 per token, GQA 4:1
    "mixtral_8x7b": ModelConfig(
        architecture="mixtral", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
        intermediate_size=14336, vocab_size=32000, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-5,
        tie_word_embeddings=False, num_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.02),
    # tiny mixture-of-experts shapes: Qwen3-MoE (every layer sparse, renormalised top-k), Qwen2-MoE
    # (a shared expert; layer 1 dense through mlp_only_layers), Mixtral (top-2 of 4)
    "tiny_qwen3_moe": ModelConfig(
        architecture="qwen3_moe", hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        intermediate_size=96, vocab_size=320, max_position_embeddings=512, rope_theta=1e6, rms_norm_eps=1e-6,
        qk_norm=True, tie_word_embeddings=False, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24,
        norm_topk_prob=True),
    "tiny_qwen2_moe": ModelConfig(
        architecture="qwen2_moe", hidden_size=56, num_layers=2, num_heads=7, num_kv_heads=1,
        intermediate_size=88, vocab_size=320, max_position_embeddings=512, rope_theta=1e6, rms_norm_eps=1e-6,
        attention_bias=True, tie_word_embeddings=False, num_experts=5, num_experts_per_tok=2,
        moe_intermediate_size=20, shared_expert_intermediate_size=40, mlp_only_layers=(1,)),
    "tiny_mixtral": ModelConfig(
        architecture="mixtral", hidden_size=48, num_layers=2, num_heads=6, num_kv_heads=2,
        intermediate_size=40, vocab_size=320, max_position_embeddings=512, rope_theta=1e6, rms_norm_eps=1e-5,
        tie_word_embeddings=False, num_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.02),
}
DEFAULT_PRESET = "llama_370m"


def preset(name: str) -> ModelConfig:
    """A fresh copy of a named preset (ValueError listing the names otherwise)."""
    try:
        return dataclasses.replace(PRESETS[name])
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; expected one of {', '.join(PRESETS)}") from None
