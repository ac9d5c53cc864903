"""Hugging Face Llama/Mistral/Phi-3/Qwen2/Qwen3/Qwen3-MoE/OLMo 2/OLMo 3/Gemma 3/gpt-oss <-> our GPT:
configs, parameter names and safetensors files.

Name mapping (i = layer):
    model.embed_tokens.weight                       -> embedding.weight
    model.layers.i.input_layernorm.weight           -> layers.i.input_layernorm.weight
    model.layers.i.self_attn.{q,k,v}_proj.{w,b}     -> layers.i.self_attention.linear_qkv.{w,b}
                                                       (grouped per KV head: [q_g..., k_g, v_g])
    model.layers.i.self_attn.o_proj.weight          -> layers.i.self_attention.linear_proj.weight
    model.layers.i.self_attn.{q,k}_norm.weight      -> layers.i.self_attention.{q,k}_layernorm.weight
                                                       (Qwen3's QK-norm)
    model.layers.i.post_attention_layernorm.weight  -> layers.i.pre_mlp_layernorm.weight
    model.layers.i.mlp.{gate,up}_proj.weight        -> layers.i.mlp.linear_fc1.weight ([gate; up])
    model.layers.i.mlp.down_proj.weight             -> layers.i.mlp.linear_fc2.weight
    Qwen3-MoE:
    model.layers.i.mlp.gate.weight                  -> layers.i.mlp.router.weight
    model.layers.i.mlp.experts.e.{gate,up}_proj.weight -> layers.i.mlp.experts.linear_fc1.weight[e]
    model.layers.i.mlp.experts.e.down_proj.weight   -> layers.i.mlp.experts.linear_fc2.weight[e]
                                                       (transformers 5's in-memory stacked
                                                       experts.gate_up_proj / down_proj read too)
    GLM-4.5 / DeepSeek-V3 (layers from first_k_dense_replace on are MoE; the first ones dense):
    model.layers.i.mlp.gate.e_score_correction_bias -> layers.i.mlp.router.expert_bias
    model.layers.i.mlp.shared_experts.{gate,up}_proj.weight -> layers.i.mlp.shared_experts.linear_fc1.weight
    model.layers.i.mlp.shared_experts.down_proj.weight -> layers.i.mlp.shared_experts.linear_fc2.weight
    (the hub's multi-token-prediction layers, numbered from num_hidden_layers, are not read)
    DeepSeek-V3 / Moonlight / Kimi K2 (multi-latent attention; a head's rows [nope; rope], the
    rope rows interleaved pairs when rope_interleave, become our [rope (rotate-half); nope]):
    model.layers.i.self_attn.q_proj.weight          -> layers.i.self_attention.linear_q_proj.weight
    model.layers.i.self_attn.q_a_proj.weight        -> layers.i.self_attention.linear_q_down_proj.weight
    model.layers.i.self_attn.q_a_layernorm.weight   -> layers.i.self_attention.q_a_layernorm.weight
    model.layers.i.self_attn.q_b_proj.weight        -> layers.i.self_attention.linear_q_up_proj.weight
    model.layers.i.self_attn.kv_a_proj_with_mqa.weight -> layers.i.self_attention.linear_kv_down_proj.weight
                                                       ([latent; k_rope], k_rope's rows reordered)
    model.layers.i.self_attn.kv_a_layernorm.weight  -> layers.i.self_attention.kv_a_layernorm.weight
    model.layers.i.self_attn.kv_b_proj.weight       -> layers.i.self_attention.linear_kv_up_proj.weight
    Gemma 3 (norms before and after each sublayer):
    model.layers.i.pre_feedforward_layernorm.weight -> layers.i.pre_mlp_layernorm.weight
    model.layers.i.post_attention_layernorm.weight  -> layers.i.post_attention_layernorm.weight
    model.layers.i.post_feedforward_layernorm.weight -> layers.i.post_mlp_layernorm.weight
    OLMo 2/3 (norms after the sublayers, q/k norms over all heads):
    model.layers.i.post_attention_layernorm.weight  -> layers.i.post_attention_layernorm.weight
    model.layers.i.post_feedforward_layernorm.weight -> layers.i.post_mlp_layernorm.weight
    model.layers.i.self_attn.{q,k}_norm.weight      -> layers.i.self_attention.{q,k}_norm_all_heads.weight
    gpt-oss (attention sinks, biased output projection and experts):
    model.layers.i.self_attn.sinks                  -> layers.i.self_attention.sinks
    model.layers.i.self_attn.o_proj.bias            -> layers.i.self_attention.linear_proj.bias
    model.layers.i.mlp.router.{weight,bias}         -> layers.i.mlp.router.{weight,bias}
    model.layers.i.mlp.experts.gate_up_proj (E, h, 2f), gate and up interleaved
                                                    -> layers.i.mlp.experts.linear_fc1.weight (E, 2f, h) [gate; up]
    model.layers.i.mlp.experts.gate_up_proj_bias    -> layers.i.mlp.experts.linear_fc1.bias [gate; up]
    model.layers.i.mlp.experts.down_proj (E, f, h)  -> layers.i.mlp.experts.linear_fc2.weight (E, h, f)
    model.layers.i.mlp.experts.down_proj_bias       -> layers.i.mlp.experts.linear_fc2.bias
    (the hub's MXFP4 ``*_blocks`` / ``*_scales`` are dequantized on import; export writes them unquantized)
    FP8 checkpoints (DeepSeek-V3, Kimi K2: ``X.weight`` in float8 e4m3 with ``X.weight_scale_inv``
    per 128 x 128 block) are dequantized to bf16 on import and export unquantized.
    model.norm.weight                               -> final_layernorm.weight
    lm_head.weight                                  -> output_layer.weight (absent when tied)
Every mapping is a pure reshuffle of values, so HF -> ours -> HF is bit-exact.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Iterator, Optional

import torch

from megatron_k15.models.config import (ROPE_SCALING_FIELDS, YARN_OPTIONAL_FIELDS, ConfigError, GPTConfig,
                                        every_nth_full)
from megatron_k15.models.lazy_state_dict import LazyStateDict, SafetensorsFiles, load_torch_file, safetensors_index_files
from megatron_k15.models.rope import rope_type as scaling_type

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                           "Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3_moe",
                           "Qwen2MoeForCausalLM": "qwen2_moe",
                           "MistralForCausalLM": "mistral", "Phi3ForCausalLM": "phi3",
                           "Olmo2ForCausalLM": "olmo2", "Olmo3ForCausalLM": "olmo3",
                           "GptOssForCausalLM": "gpt_oss", "Gemma3ForCausalLM": "gemma3",
                           "Gemma2ForCausalLM": "gemma2",
                           "GlmForCausalLM": "glm", "Glm4ForCausalLM": "glm4", "SmolLM3ForCausalLM": "smollm3",
                           "Exaone4ForCausalLM": "exaone4", "Glm4MoeForCausalLM": "glm4_moe",
                           "DeepseekV3ForCausalLM": "deepseek_v3", "DeepseekV2ForCausalLM": "deepseek_v2"}
MODEL_TYPES = {"gemma3": "gemma3_text"}  # HF's model_type where it is not the architecture's name
# image-text checkpoints whose language model converts (the vision tower is left out): Gemma 3
# 4B-27B ship only as these; their text config is ``text_config``, their tensors' prefixes below
MULTIMODAL_TEXT_MODELS = {"Gemma3ForConditionalGeneration": "Gemma3ForCausalLM"}
TEXT_MODEL_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                       ("language_model.lm_head.", "lm_head."))
# DeepSeek-V3-style MoE: sigmoid router with a score-correction bias and groups, shared experts,
# the first layers dense (``_deepseek_moe_fields``)
DEEPSEEK_MOE_ARCHITECTURES = ("glm4_moe", "deepseek_v3", "deepseek_v2")
MLA_ARCHITECTURES = ("deepseek_v3", "deepseek_v2")  # multi-latent attention
QWEN_MOE_ARCHITECTURES = ("qwen2_moe", "qwen3_moe")  # softmax top-k; dense layers from mlp_only_layers
MOE_ARCHITECTURES = QWEN_MOE_ARCHITECTURES + ("gpt_oss",) + DEEPSEEK_MOE_ARCHITECTURES
FUSED_QKV_ARCHITECTURES = ("phi3",)  # one qkv_proj tensor per layer
FUSED_GATE_UP_ARCHITECTURES = ("phi3", "glm", "glm4")  # one gate_up_proj tensor per layer
# GLM rotates channel pairs (2i, 2i+1) of the first partial_rotary_factor of each head; the
# rows of q and k are reordered on conversion to our rotate-half pairs (i, i + r/2)
INTERLEAVED_ROPE_ARCHITECTURES = ("glm", "glm4")
SANDWICH_ARCHITECTURES = ("gemma2", "gemma3", "glm4")  # a norm before and after each sublayer
# Gemma's block: (1 + w) fp32 norms around each sublayer, GeGLU, embeddings scaled by sqrt(hidden);
# Gemma 2 adds soft caps on the attention scores and the final logits, Gemma 3 q/k norms instead
GEMMA_ARCHITECTURES = ("gemma2", "gemma3")
QK_NORM_ARCHITECTURES = ("qwen3", "qwen3_moe", "olmo2", "olmo3", "gemma3", "exaone4")
OLMO_ARCHITECTURES = ("olmo2", "olmo3")  # post-norm blocks, q/k norms over all heads, fp32 norm weights
# Where the sliding window comes from: Qwen's use_sliding_window + max_window_layers (or
# layer_types); Mistral's / Phi-3's sliding_window on every layer; OLMo 3's layer_types
# the classes whose attention_bias puts a bias on o_proj too (not only on q, k, v)
OUTPUT_BIAS_ARCHITECTURES = ("llama", "qwen3", "qwen3_moe", "olmo2", "olmo3", "gemma2", "gemma3", "smollm3")
QWEN_ARCHITECTURES = ("qwen2", "qwen3", "qwen3_moe", "qwen2_moe")
USE_SLIDING_WINDOW_ARCHITECTURES = QWEN_ARCHITECTURES + ("smollm3",)  # use_sliding_window + layer_types
HF_CLASS = {arch: cls for cls, arch in SUPPORTED_ARCHITECTURES.items()}
HF_CONFIG_FILE = "config.json"


class HFCheckpointError(ValueError):
    """An HF checkpoint we cannot convert; the message names the file and field."""


# -- configs --------------------------------------------------------------------------------
def _rope_settings(hf: dict, where: str) -> tuple[float, Optional[dict]]:
    """(theta, our rope_scaling) from an HF config's rope_theta / rope_scaling (transformers 4)
    or rope_parameters (transformers 5)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or None
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    phi3 = hf.get("model_type") == "phi3" or "Phi3ForCausalLM" in (hf.get("architectures") or ())
    if rope_type == "su" or (phi3 and rope_type == "yarn"):  # Phi3Config's older names for LongRoPE
        rope_type = "longrope"
    if rope_type == "default":
        return float(theta), None
    if rope_type not in ROPE_SCALING_FIELDS:
        raise HFCheckpointError(f"{where}: rope type {rope_type!r} is not supported "
                                f"(default, {', '.join(sorted(ROPE_SCALING_FIELDS))})")
    src = {**(scaling or {}), **params}
    if rope_type == "longrope":  # as transformers reads it: a top-level original context wins
        # (Phi3Config always has one, 4096 by default), and the factor defaults to the growth
        if hf.get("original_max_position_embeddings") is not None or phi3:
            src["original_max_position_embeddings"] = hf.get("original_max_position_embeddings", 4096)
        src.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
        if src.get("factor") is None and src["original_max_position_embeddings"]:
            src["factor"] = float(hf.get("max_position_embeddings", 4096)) / float(src["original_max_position_embeddings"])
    try:
        out = {k: src[k] for k in ROPE_SCALING_FIELDS[rope_type]}
    except KeyError as e:
        raise HFCheckpointError(f"{where}: {rope_type} rope scaling is missing field {e.args[0]!r}") from None
    if rope_type == "yarn":
        out.update({k: src[k] for k in YARN_OPTIONAL_FIELDS if src.get(k) is not None})
    if rope_type == "longrope":
        out.update(short_factor=[float(f) for f in out["short_factor"]], long_factor=[float(f) for f in out["long_factor"]],
                   original_max_position_embeddings=int(out["original_max_position_embeddings"]),
                   factor=float(out["factor"]))
        if src.get("attention_factor") is not None:
            out["attention_factor"] = float(src["attention_factor"])
    out["rope_type"] = rope_type
    return float(theta), out


def _layer_type_rope(hf: dict, arch: str, where: str) -> tuple[tuple, Optional[dict]]:
    """((theta, scaling) of the full-attention layers, our ``sliding_rope`` or None). Per layer
    type: transformers 5 nests rope_parameters by layer type; OLMo 3's older configs scale
    (rope_scaling) the full-attention layers only."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get("full_attention"), dict):
        # (LongRoPE's default factor needs the context; transformers' nested branch has no
        # top-level original context)
        def nested(sub):
            return {"max_position_embeddings": hf.get("max_position_embeddings", 4096), "rope_parameters": sub}

        full = _rope_settings(nested(params["full_attention"]), where)
        sliding_params = params.get("sliding_attention")
        sliding = full if not isinstance(sliding_params, dict) else _rope_settings(nested(sliding_params), where)
    else:
        full = _rope_settings(hf, where)
        sliding = (full[0], None) if arch == "olmo3" else full
        if arch == "gemma3":  # the hub's Gemma 3: rope_scaling for the global layers, a local base
            sliding = (float(hf.get("rope_local_base_freq", 10000.0)), None)
    if sliding == full:
        return full, None
    return full, {"rotary_base": sliding[0], "rope_scaling": sliding[1]}


def _sliding_layout(hf: dict, arch: str, where: str) -> dict:
    """Our ``sliding_window`` and ``layer_types`` fields from an HF config ({} for none)."""
    n = int(hf["num_hidden_layers"])
    window = hf.get("sliding_window", 4096 if arch == "mistral" else None)
    types = hf.get("layer_types")
    if arch in USE_SLIDING_WINDOW_ARCHITECTURES:
        if not hf.get("use_sliding_window"):
            window = None
        elif types is None and arch == "qwen2_moe":  # Qwen2MoeConfig's rule: every other layer below it
            last = int(hf.get("max_window_layers", n))
            types = ["sliding_attention" if (i + 1) % 2 and i < last else "full_attention" for i in range(n)]
        elif types is None:  # Qwen2Config's rule
            first = int(hf.get("max_window_layers", n))
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    elif arch in ("mistral", "phi3"):
        # every layer slides; a window as long as the context never binds inside it (Phi-4,
        # Phi-3-128K), so it is dropped and those models keep the ring for context parallelism
        if window is not None and int(window) >= int(hf.get("max_position_embeddings", 4096)):
            window = None
        types = None
    elif arch == "exaone4":  # EXAONE 4.0 32B: three sliding layers per global one; 1.2B: all global
        if window is not None and types is None:
            types = every_nth_full(n, int(hf.get("sliding_window_pattern") or 4))
    elif arch in ("olmo3", "gpt_oss", "gemma2", "gemma3"):
        if window is None:
            raise HFCheckpointError(f"{where}: {HF_CLASS[arch]} without sliding_window")
        if types is None:  # the configs' defaults: OLMo 3 every fourth layer full, gpt-oss and
            # Gemma 2 every second, Gemma 3 every sliding_window_pattern-th (6)
            every = {"olmo3": 4, "gpt_oss": 2, "gemma2": 2}.get(arch) or int(
                hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6)
            types = every_nth_full(n, every)
    else:
        window = None
    if window is None or (types is not None and "sliding_attention" not in types):
        if any(t != "full_attention" for t in types or []):
            raise HFCheckpointError(f"{where}: layer_types={types!r} name sliding layers but no "
                                    "sliding_window is set")
        return {}
    if types is not None and len(types) != n:
        raise HFCheckpointError(f"{where}: layer_types has {len(types)} entries for num_hidden_layers={n}")
    if int(window) < 1:
        raise HFCheckpointError(f"{where}: sliding_window={window} must be a positive number of tokens")
    return {"sliding_window": int(window), "layer_types": None if types is None else list(types)}


def _text_model_config(hf: dict, where: str) -> dict:
    """An image-text model's language model as a causal LM's config (its ``text_config``, with
    the defaults of its transformers class filled in when transformers is installed: the hub's
    text configs hold only what differs)."""
    archs = hf.get("architectures") or []
    text = dict(hf.get("text_config") or {})
    if not text:
        raise HFCheckpointError(f"{where}: {archs} without text_config")
    try:
        import transformers

        cls = getattr(transformers, MULTIMODAL_TEXT_MODELS[archs[0]].replace("ForCausalLM", "TextConfig"))
        text = {k: v for k, v in cls(**text).to_dict().items() if k not in ("id2label", "label2id")}
    except (ImportError, AttributeError):
        pass
    text.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", True))
    text["architectures"] = [MULTIMODAL_TEXT_MODELS[archs[0]]]
    return text


def text_model_state_dict(hf_sd: Mapping) -> Mapping:
    """The language model's tensors of an image-text checkpoint under a causal LM's names
    (others, the vision tower's, dropped; nothing is read); a causal LM's state dict as it is."""
    if "model.embed_tokens.weight" in hf_sd:
        return hf_sd
    names = {}
    for name in hf_sd:
        for old, new in TEXT_MODEL_PREFIXES:
            if name.startswith(old):
                names[new + name[len(old):]] = name
                break
        else:
            if name == "lm_head.weight":
                names[name] = name
    return LazyStateDict.view(hf_sd, names)


def gpt_config_from_hf(hf: dict, where: str = HF_CONFIG_FILE) -> GPTConfig:
    """Our config from an HF ``config.json`` dict; unsupported models fail with the field named.
    An image-text model (``MULTIMODAL_TEXT_MODELS``) gives its language model's."""
    archs = hf.get("architectures") or []
    if archs and archs[0] in MULTIMODAL_TEXT_MODELS:
        hf = _text_model_config(hf, where)
        archs = hf["architectures"]
    arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise HFCheckpointError(
            f"{where}: architectures={archs!r} is not supported; "
            f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
        )
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    for key in required:
        if key not in hf or hf[key] is None:
            raise HFCheckpointError(f"{where}: missing required field {key!r}")
    if arch in GEMMA_ARCHITECTURES:
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        if act != "gelu_pytorch_tanh":
            raise HFCheckpointError(f"{where}: hidden_activation={act!r} is not supported (gelu_pytorch_tanh)")
        refused = ("use_bidirectional_attention",) + (
            ("attn_logit_softcapping", "final_logit_softcapping") if arch == "gemma3" else ())
        for key in refused:
            if hf.get(key):
                raise HFCheckpointError(f"{where}: {key}={hf[key]!r} is not supported")
    elif hf.get("hidden_act", "silu") != "silu" and arch != "gpt_oss":
        raise HFCheckpointError(f"{where}: hidden_act={hf['hidden_act']!r} is not supported (silu only)")
    if hf.get("mlp_bias"):
        raise HFCheckpointError(f"{where}: mlp_bias=true is not supported")
    sliding = _sliding_layout(hf, arch, where)
    rotary = (hf.get("rope_parameters") or {}).get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    half = INTERLEAVED_ROPE_ARCHITECTURES + ("glm4_moe",)  # GLM's default: RoPE on half of each head
    rotary = float(rotary if rotary is not None else (0.5 if arch in half else 1.0))
    (theta, scaling), sliding_rope = _layer_type_rope(hf, arch, where)
    if not sliding:
        sliding_rope = None
    heads = int(hf["num_attention_heads"])
    moe = {}
    if arch in QWEN_MOE_ARCHITECTURES:
        # layer i is MoE iff i is not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0
        n, step = int(hf["num_hidden_layers"]), int(hf.get("decoder_sparse_step") or 1)
        dense = set(hf.get("mlp_only_layers") or [])
        pattern = [int(i not in dense and (i + 1) % step == 0) for i in range(n)]
        if not any(pattern):
            raise HFCheckpointError(f"{where}: decoder_sparse_step={step} / mlp_only_layers={sorted(dense)} leave "
                                    f"no MoE layer of {n}")
        experts = hf.get("num_experts", hf.get("num_local_experts"))
        for key, value in (("num_experts", experts), ("num_experts_per_tok", hf.get("num_experts_per_tok")),
                           ("moe_intermediate_size", hf.get("moe_intermediate_size"))):
            if value is None:
                raise HFCheckpointError(f"{where}: missing required field {key!r}")
        moe = dict(num_moe_experts=int(experts), moe_router_topk=int(hf["num_experts_per_tok"]),
                   moe_ffn_hidden_size=int(hf["moe_intermediate_size"]),
                   moe_norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                   moe_layer_freq=1 if all(pattern) else pattern)
        if arch == "qwen2_moe":  # a shared expert, gated per token by sigmoid(x . g)
            shared = hf.get("shared_expert_intermediate_size")
            if not shared:
                raise HFCheckpointError(f"{where}: missing required field 'shared_expert_intermediate_size'")
            moe.update(moe_shared_expert_intermediate_size=int(shared), moe_shared_expert_gate=True)
    if arch == "gpt_oss":  # softmax over the top-k router logits == renormalised top-k probabilities
        for key in ("num_local_experts", "num_experts_per_tok"):
            if hf.get(key) is None:
                raise HFCheckpointError(f"{where}: missing required field {key!r}")
        moe = dict(num_moe_experts=int(hf["num_local_experts"]), moe_router_topk=int(hf["num_experts_per_tok"]),
                   moe_ffn_hidden_size=int(hf["intermediate_size"]), moe_norm_topk_prob=True,
                   moe_router_bias=True, moe_expert_bias=True, activation="swiglu_clamped",
                   swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)), swiglu_limit=float(hf.get("swiglu_limit", 7.0)),
                   attention_sinks=True, add_attention_output_bias=bool(hf.get("attention_bias", True)))
    if arch in DEEPSEEK_MOE_ARCHITECTURES:
        moe = _deepseek_moe_fields(hf, where, arch)
    mla = _mla_fields(hf, where) if arch in MLA_ARCHITECTURES else {}
    qkv_bias = bool(hf.get("qkv_bias", True)) if arch in ("qwen2", "qwen2_moe") else bool(hf.get("attention_bias", arch in ("gpt_oss", "glm", "glm4")))
    nope = None
    if arch == "smollm3":  # no_rope_layers[i] == 0: layer i has no RoPE (default: every fourth)
        flags = hf.get("no_rope_layers")
        if flags is None:
            every = int(hf.get("no_rope_layer_interval") or 4)
            flags = [int((i + 1) % every != 0) for i in range(int(hf["num_hidden_layers"]))]
        if len(flags) != int(hf["num_hidden_layers"]):
            raise HFCheckpointError(f"{where}: no_rope_layers has {len(flags)} entries for num_hidden_layers="
                                    f"{hf['num_hidden_layers']}")
        nope = [i for i, f in enumerate(flags) if not f] or None
    if arch == "exaone4" and sliding:  # the hybrid model's global layers have no RoPE
        nope = [i for i, t in enumerate(sliding["layer_types"]) if t == "full_attention"] or None
    olmo = arch in OLMO_ARCHITECTURES
    if arch == "exaone4":  # norms after the sublayers as OLMo's, per-head q/k norms, Llama's RMSNorm
        placement = {"norm_placement": "post", "norm_in_fp32": False}
    elif arch == "glm4":  # plain RMSNorms before and after each sublayer
        placement = {"norm_placement": "sandwich", "norm_in_fp32": False}
    else:
        placement = {"norm_placement": "post" if olmo else "pre", "norm_in_fp32": olmo}
    gemma = {}
    if arch in GEMMA_ARCHITECTURES:  # (1 + w) norms before and after each sublayer, scaled embeddings, GeGLU
        gemma = dict(norm_placement="sandwich", norm_weight_offset=1.0, norm_in_fp32=True, activation="geglu_tanh",
                     embedding_multiplier=float(hf["hidden_size"]) ** 0.5,
                     attention_softmax_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5)
    if arch == "gemma2":  # Gemma2Config's defaults: 50 on the scores, 30 on the logits
        for key, default in (("attn_logit_softcapping", 50.0), ("final_logit_softcapping", 30.0)):
            value = hf.get(key, default)
            gemma[key] = float(value) if value else None
    cfg = GPTConfig(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        ffn_hidden_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads") or heads),
        # Qwen3Config's head_dim defaults to 128 (decoupled); the others derive it
        # (Qwen3MoeConfig has no such default: it derives the head size like the others)
        kv_channels=int(hf.get("head_dim") or (128 if arch == "qwen3" else hf["hidden_size"] // heads)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        rotary_base=theta,
        rotary_percent=rotary,
        rope_scaling=scaling,
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        add_qkv_bias=qkv_bias,
        **({"add_attention_output_bias": qkv_bias} if arch in OUTPUT_BIAS_ARCHITECTURES else {}),
        qk_layernorm=arch in QK_NORM_ARCHITECTURES or (arch == "glm4_moe" and bool(hf.get("use_qk_norm"))),
        qk_layernorm_scope="all" if olmo else "head",
        **(placement if not gemma else gemma),
        sliding_rope=sliding_rope,
        nope_layers=nope,
        **sliding,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", arch in GEMMA_ARCHITECTURES + ("smollm3",))),
        architecture=arch,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        extra={"hf_config": hf},
        **moe,
        **mla,
    )
    try:
        cfg.validate()
    except ConfigError as e:
        raise HFCheckpointError(f"{where}: {e}") from None
    return cfg


def _deepseek_moe_fields(hf: dict, where: str, arch: str) -> dict:
    """Our MoE fields from a DeepSeek-V3 / GLM-4.5 config: sigmoid scores (``scoring_func``)
    with the score-correction bias choosing (``topk_method`` noaux_tc), n_group / topk_group,
    routed_scaling_factor, n_shared_experts shared experts of moe_intermediate_size, and layer
    i MoE iff i >= first_k_dense_replace and i % moe_layer_freq == 0; the router in fp32.
    DeepSeek-V2: softmax scores, greedy or group_limited_greedy (a group scores by its best),
    the k weights not renormalised."""
    for key in ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size"):
        if hf.get(key) is None:
            raise HFCheckpointError(f"{where}: missing required field {key!r}")
    v2 = arch == "deepseek_v2"  # softmax scores, no bias, never renormalised, a group scores by its best
    if v2 and hf.get("norm_topk_prob"):  # transformers' V2 ignores it, DeepSeek's own code renormalises
        raise HFCheckpointError(f"{where}: norm_topk_prob=true is not supported for DeepseekV2ForCausalLM "
                                "(transformers never renormalises its weights; DeepSeek's code does)")
    methods = ("greedy", "group_limited_greedy") if v2 else ("noaux_tc",)
    if hf.get("scoring_func", "softmax" if v2 else "sigmoid") != ("softmax" if v2 else "sigmoid"):
        raise HFCheckpointError(f"{where}: scoring_func={hf['scoring_func']!r} is not supported")
    if hf.get("topk_method", methods[0]) not in methods:
        raise HFCheckpointError(f"{where}: topk_method={hf['topk_method']!r} is not supported ({', '.join(methods)})")
    n, first = int(hf["num_hidden_layers"]), int(hf.get("first_k_dense_replace") or 0)
    every = 1 if v2 else int(hf.get("moe_layer_freq") or 1)  # (transformers' V2 reads no moe_layer_freq)
    pattern = [int(i >= first and i % every == 0) for i in range(n)]
    if not any(pattern):
        raise HFCheckpointError(f"{where}: first_k_dense_replace={first} leaves no MoE layer of {n}")
    f, shared = int(hf["moe_intermediate_size"]), int(hf.get("n_shared_experts") or 0)
    grouped = hf.get("topk_method") == "group_limited_greedy" if v2 else True
    groups = int(hf.get("n_group") or 1) if grouped else 1
    return dict(num_moe_experts=int(hf["n_routed_experts"]), moe_router_topk=int(hf["num_experts_per_tok"]),
                moe_ffn_hidden_size=f, moe_norm_topk_prob=False if v2 else bool(hf.get("norm_topk_prob", True)),
                moe_router_score_function="softmax" if v2 else "sigmoid", moe_router_enable_expert_bias=not v2,
                moe_router_dtype="fp32", moe_router_group_score_topk=1 if v2 else 2,
                moe_router_num_groups=groups if groups > 1 else None,
                moe_router_group_topk=int(hf.get("topk_group") or 1) if groups > 1 else None,
                moe_router_topk_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
                moe_shared_expert_intermediate_size=shared * f if shared else None,
                moe_layer_freq=1 if all(pattern) else pattern)


def _mla_fields(hf: dict, where: str) -> dict:
    """Our multi-latent attention fields from a DeepSeek-V3 config."""
    for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        if hf.get(key) is None:
            raise HFCheckpointError(f"{where}: missing required field {key!r}")
    if hf.get("attention_bias"):
        raise HFCheckpointError(f"{where}: attention_bias=true is not supported with multi-latent attention")
    return dict(multi_latent_attention=True, q_lora_rank=int(hf["q_lora_rank"]) if hf.get("q_lora_rank") else None,
                kv_lora_rank=int(hf["kv_lora_rank"]), qk_head_dim=int(hf["qk_nope_head_dim"]),
                qk_pos_emb_head_dim=int(hf["qk_rope_head_dim"]), v_head_dim=int(hf["v_head_dim"]))


def _hf_deepseek_moe_fields(cfg: GPTConfig) -> dict:
    """Inverse of ``_deepseek_moe_fields``; refuses what DeepSeek's config cannot say."""
    pattern = [int(cfg.is_moe_layer(i)) for i in range(cfg.num_layers)]
    first = pattern.index(1)
    shared = cfg.moe_shared_expert_intermediate_size or 0
    v2 = cfg.architecture == "deepseek_v2"
    # (a group's score rule matters only with groups)
    group_score = cfg.moe_router_group_score_topk if (cfg.moe_router_num_groups or 1) > 1 else (1 if v2 else 2)
    router = ((cfg.moe_router_score_function, cfg.moe_router_enable_expert_bias, group_score)
              == (("softmax", False, 1) if v2 else ("sigmoid", True, 2))) and not (v2 and cfg.moe_norm_topk_prob)
    if (not router or pattern != [0] * first + [1] * (cfg.num_layers - first) or shared % cfg.moe_ffn_hidden_size):
        raise ConfigError(f"{HF_CLASS[cfg.architecture]}'s experts are routed by "
                          + ("softmax scores, not renormalised, groups scored by their best expert"
                             if v2 else "sigmoid scores with an expert bias, groups scored by their best two")
                          + ", every layer from the first MoE one on is MoE, and the shared expert is a whole "
                          f"number of experts (--moe-layer-freq {pattern})")
    out = {} if not v2 else {"topk_method": "group_limited_greedy" if cfg.moe_router_num_groups else "greedy"}
    return out | {"n_routed_experts": cfg.num_moe_experts, "num_experts_per_tok": cfg.moe_router_topk,
            "moe_intermediate_size": cfg.moe_ffn_hidden_size, "n_shared_experts": shared // cfg.moe_ffn_hidden_size,
            "first_k_dense_replace": first, "n_group": cfg.moe_router_num_groups or 1,
            "topk_group": cfg.moe_router_group_topk or 1, "norm_topk_prob": cfg.moe_norm_topk_prob,
            "routed_scaling_factor": cfg.moe_router_topk_scaling_factor or 1.0, "num_nextn_predict_layers": 0}


def hf_config_from_gpt(cfg: GPTConfig) -> dict:
    """An HF config dict; the original one when the model came from HF (exact round trip)."""
    if "hf_config" in cfg.extra:  # less a quantization: the weights export dequantized
        return {k: v for k, v in cfg.extra["hf_config"].items() if k != "quantization_config"}
    arch = cfg.architecture
    if arch not in HF_CLASS:
        raise ConfigError(f"architecture {arch!r} has no HF class; choose one of {sorted(HF_CLASS)}")
    if cfg.is_moe != (arch in MOE_ARCHITECTURES):
        raise ConfigError(f"mixture-of-experts models export as one of {list(MOE_ARCHITECTURES)}, dense ones as "
                          "'qwen2', 'qwen3', 'llama', 'mistral', 'phi3' or 'olmo2/3'")
    gpt_oss = (cfg.attention_sinks, cfg.moe_router_bias, cfg.moe_expert_bias, cfg.activation == "swiglu_clamped",
               cfg.add_attention_output_bias == cfg.add_qkv_bias, cfg.moe_norm_topk_prob)
    if (arch == "gpt_oss") != all(gpt_oss) or (arch != "gpt_oss" and any(gpt_oss[:4])):
        raise ConfigError("gpt-oss's layers (attention sinks, biased router and experts, clamped SwiGLU) export only "
                          "as architecture 'gpt_oss', and it needs all of them")
    if arch in OUTPUT_BIAS_ARCHITECTURES and cfg.add_attention_output_bias != cfg.add_qkv_bias:
        raise ConfigError(f"{HF_CLASS[arch]}'s attention_bias biases q, k, v and o_proj alike; this model has "
                          f"add_qkv_bias={cfg.add_qkv_bias}, add_attention_output_bias={cfg.add_attention_output_bias}"
                          + (": export it as architecture 'qwen2' (QKV bias only)" if cfg.add_qkv_bias
                             and not cfg.is_moe else ""))
    olmo = arch in OLMO_ARCHITECTURES
    if olmo != (cfg.norm_placement == "post" and cfg.qk_layernorm and cfg.qk_layernorm_scope == "all"
                and cfg.norm_in_fp32):
        raise ConfigError("OLMo's blocks (norms after the sublayers, q/k norms over all heads) export only as "
                          "architecture 'olmo2' or 'olmo3', and those need exactly that block")
    if cfg.norm_placement == "post" and not (olmo or arch == "exaone4"):
        raise ConfigError("norms after the sublayers export only as architecture 'olmo2', 'olmo3' or 'exaone4'")
    gemma = (cfg.norm_placement == "sandwich", cfg.norm_weight_offset == 1.0, cfg.activation == "geglu_tanh",
             cfg.embedding_multiplier == cfg.hidden_size ** 0.5, cfg.norm_in_fp32)
    if (arch in GEMMA_ARCHITECTURES) != all(gemma) or (arch not in GEMMA_ARCHITECTURES and any(gemma[1:4])):
        raise ConfigError("Gemma's block ((1 + w) norms around each sublayer, GeGLU, scaled embeddings) exports "
                          "only as architecture 'gemma2' or 'gemma3', and those need all of it")
    if gemma[0] != (arch in SANDWICH_ARCHITECTURES):
        raise ConfigError("norms before and after each sublayer export only as architecture 'gemma2', 'gemma3' "
                          "(with Gemma's block) or 'glm4' (plain RMSNorms), and those need them")
    if (cfg.attn_logit_softcapping or cfg.final_logit_softcapping) and arch != "gemma2":
        raise ConfigError("soft-capped attention scores or logits export only as architecture 'gemma2'")
    nope = sorted(cfg.nope_layers or [])
    if arch == "exaone4":  # its layers without RoPE are the global ones, when others slide
        want = [i for i in range(cfg.num_layers) if not cfg.is_sliding_layer(i)] if cfg.has_sliding_layers else []
        if nope != want:
            raise ConfigError(f"Exaone4ForCausalLM leaves exactly its global layers without RoPE when others "
                              f"slide (and none otherwise): nope_layers must be {want or None}, got {cfg.nope_layers}")
    elif nope and arch != "smollm3":
        raise ConfigError(f"layers without RoPE (nope_layers {cfg.nope_layers}) export only as architecture "
                          f"'smollm3' or 'exaone4', not {arch!r}")
    if cfg.rotary_percent != 1.0 and arch not in ("phi3", "glm", "glm4", "glm4_moe"):
        raise ConfigError(f"partial RoPE (--rotary-percent {cfg.rotary_percent}) exports only as architecture "
                          f"'glm', 'glm4' (interleaved pairs), 'glm4_moe' or 'phi3', not {arch!r}")
    deepseek_routing = (cfg.moe_router_score_function != "softmax", cfg.moe_router_enable_expert_bias,
                        cfg.moe_router_num_groups is not None, cfg.moe_router_topk_scaling_factor is not None,
                        bool(cfg.moe_shared_expert_intermediate_size) and arch != "qwen2_moe",
                        arch not in QWEN_MOE_ARCHITECTURES and cfg.is_moe and cfg.num_moe_layers != cfg.num_layers)
    if (arch == "qwen2_moe") != (cfg.moe_shared_expert_gate and bool(cfg.moe_shared_expert_intermediate_size)):
        raise ConfigError("a gated shared expert (--moe-shared-expert-gate) exports only as architecture "
                          "'qwen2_moe' (Qwen2MoeForCausalLM), and that needs one")
    if cfg.multi_latent_attention != (arch in MLA_ARCHITECTURES):
        raise ConfigError("multi-latent attention exports only as architecture 'deepseek_v3' or 'deepseek_v2' "
                          "(DeepseekV3ForCausalLM, DeepseekV2ForCausalLM), and those need it")
    if cfg.multi_latent_attention and cfg.mla_latent_norm_epsilon != 1e-6:
        raise ConfigError(f"DeepseekV3ForCausalLM's latent norms have epsilon 1e-6; mla_latent_norm_epsilon is "
                          f"{cfg.mla_latent_norm_epsilon}")
    if any(deepseek_routing) and arch not in DEEPSEEK_MOE_ARCHITECTURES:
        raise ConfigError(f"DeepSeek-style experts (sigmoid router, expert bias, groups, scaling, shared experts, "
                          f"dense layers among MoE ones) export only as {list(DEEPSEEK_MOE_ARCHITECTURES)}, "
                          f"not {arch!r}")
    if not olmo and arch != "glm4_moe" and cfg.qk_layernorm != (arch in QK_NORM_ARCHITECTURES):
        raise ConfigError("QK layernorm is Qwen3's: export a model with --qk-layernorm as architecture "
                          "'qwen3' (or 'qwen3_moe'), one without as 'qwen2', 'llama', 'mistral' or 'phi3'")
    hf = {
        "architectures": [HF_CLASS[arch]],
        "model_type": MODEL_TYPES.get(arch, arch),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_epsilon,
        "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_theta": cfg.rotary_base,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "torch_dtype": "float32",
    }
    if cfg.rope_scaling:
        hf["rope_scaling"] = {"rope_type": "llama3", **cfg.rope_scaling}  # older configs lack the type
    hf.update(_hf_sliding_fields(cfg))
    if arch in GEMMA_ARCHITECTURES:
        scalar = (cfg.attention_softmax_scale or cfg.head_dim ** -0.5) ** -2  # Gemma3TextConfig takes an int
        hf.update(attention_bias=cfg.add_qkv_bias, hidden_activation="gelu_pytorch_tanh",
                  query_pre_attn_scalar=int(round(scalar)) if abs(scalar - round(scalar)) < 1e-6 else scalar,
                  attn_logit_softcapping=cfg.attn_logit_softcapping,
                  final_logit_softcapping=cfg.final_logit_softcapping)
        hf.pop("hidden_act")
    elif arch == "llama":
        hf["attention_bias"] = cfg.add_qkv_bias
        hf["mlp_bias"] = False
    elif arch in QK_NORM_ARCHITECTURES:
        hf["attention_bias"] = cfg.add_qkv_bias
    elif arch in ("glm", "glm4"):
        hf.update(attention_bias=cfg.add_qkv_bias, partial_rotary_factor=cfg.rotary_percent, pad_token_id=None)
    elif arch in MLA_ARCHITECTURES:
        hf.update(q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_head_dim,
                  qk_rope_head_dim=cfg.qk_pos_emb_head_dim, v_head_dim=cfg.v_head_dim,
                  head_dim=cfg.qk_pos_emb_head_dim, attention_bias=False, pad_token_id=None,
                  **_hf_deepseek_moe_fields(cfg))
        if arch == "deepseek_v3":  # (V2's pairs are always interleaved)
            hf["rope_interleave"] = True
        if cfg.rope_scaling:  # YaRN's fields as they are (no llama3 default type)
            hf["rope_scaling"] = dict(cfg.rope_scaling)
    elif arch == "glm4_moe":
        hf.update(attention_bias=cfg.add_qkv_bias, partial_rotary_factor=cfg.rotary_percent, pad_token_id=None,
                  use_qk_norm=cfg.qk_layernorm, **_hf_deepseek_moe_fields(cfg))
    elif arch == "exaone4":
        hf.update(attention_bias=cfg.add_qkv_bias, pad_token_id=None)
    elif arch == "smollm3":
        hf.update(attention_bias=cfg.add_qkv_bias, mlp_bias=False, pad_token_id=None,
                  no_rope_layers=[int(cfg.uses_rope(i)) for i in range(cfg.num_layers)])
    elif arch in ("mistral", "phi3"):
        if cfg.add_qkv_bias:
            raise ConfigError(f"{HF_CLASS[arch]} has no QKV bias; export a model with it as architecture "
                              "'qwen2' or 'llama'")
        hf.setdefault("sliding_window", None)
        if arch == "phi3":  # (Phi3Config's default pad id, 32000, may lie outside a smaller vocabulary)
            hf.update(pad_token_id=None, partial_rotary_factor=cfg.rotary_percent)
            if scaling_type(cfg.rope_scaling) == "longrope":  # read from the top level (4096 when absent)
                hf["original_max_position_embeddings"] = cfg.rope_scaling["original_max_position_embeddings"]
    elif arch in ("gpt_oss", "qwen2_moe"):
        pass  # attention_bias / qkv_bias below
    elif not cfg.add_qkv_bias:
        raise ConfigError("Qwen2 always has QKV bias; export a model without it as architecture 'llama'")
    if arch == "gpt_oss":
        hf.update(num_local_experts=cfg.num_moe_experts, num_experts_per_tok=cfg.moe_router_topk,
                  intermediate_size=cfg.moe_ffn_hidden_size, swiglu_alpha=cfg.swiglu_alpha,
                  swiglu_limit=cfg.swiglu_limit, attention_bias=cfg.add_qkv_bias, router_aux_loss_coef=0.0,
                  output_router_logits=False)
        if cfg.rope_scaling:  # YaRN's fields as they are (no llama3 default type)
            hf["rope_scaling"] = dict(cfg.rope_scaling)
    if arch in QWEN_MOE_ARCHITECTURES:
        hf.update(num_experts=cfg.num_moe_experts, num_experts_per_tok=cfg.moe_router_topk,
                  moe_intermediate_size=cfg.moe_ffn_hidden_size, norm_topk_prob=cfg.moe_norm_topk_prob,
                  decoder_sparse_step=1, mlp_only_layers=[i for i in range(cfg.num_layers) if not cfg.is_moe_layer(i)],
                  router_aux_loss_coef=0.0, output_router_logits=False)
    if arch == "qwen2_moe":
        hf.update(shared_expert_intermediate_size=cfg.moe_shared_expert_intermediate_size, qkv_bias=cfg.add_qkv_bias)
    return hf


def _hf_sliding_fields(cfg: GPTConfig) -> dict:
    """The HF config fields of our sliding window (Qwen: sliding layers after the first
    max_window_layers; Mistral / Phi-3: all layers; OLMo 3: layer_types and a RoPE per type)."""
    arch = cfg.architecture
    if not cfg.has_sliding_layers:
        if arch in ("gpt_oss", "gemma2", "gemma3"):  # their configs would otherwise slide some layers
            return {"sliding_window": cfg.max_position_embeddings,
                    "layer_types": ["full_attention"] * cfg.num_layers}
        if arch == "exaone4":  # (EXAONE 4.0 1.2B's form: every layer global, with RoPE)
            return {"sliding_window": None, "layer_types": ["full_attention"] * cfg.num_layers}
        if cfg.sliding_rope is not None:
            raise ConfigError("sliding_rope is set but no layer slides")
        return {"use_sliding_window": False} if arch in USE_SLIDING_WINDOW_ARCHITECTURES else {}
    types = ["sliding_attention" if cfg.is_sliding_layer(i) else "full_attention" for i in range(cfg.num_layers)]
    if cfg.sliding_rope is not None and arch not in ("olmo3", "gemma3"):
        raise ConfigError(f"a separate RoPE for the sliding layers (sliding_rope) exports only as 'olmo3' or "
                          f"'gemma3', not {arch!r}")
    if arch == "qwen2_moe":  # explicit layer_types (its config's own rule differs from Qwen2's)
        return {"use_sliding_window": True, "sliding_window": cfg.sliding_window, "max_window_layers": cfg.num_layers,
                "layer_types": types}
    if arch in USE_SLIDING_WINDOW_ARCHITECTURES:
        first = types.index("sliding_attention")
        if "full_attention" in types[first:]:
            raise ConfigError(f"{HF_CLASS[arch]} slides on the layers from max_window_layers on; layer_types "
                              f"{types} is not of that form")
        return {"use_sliding_window": True, "sliding_window": cfg.sliding_window, "max_window_layers": first,
                "layer_types": types}
    if arch in ("gpt_oss", "exaone4", "gemma2"):
        return {"sliding_window": cfg.sliding_window, "layer_types": types}
    if arch in ("mistral", "phi3"):
        if "full_attention" in types:
            raise ConfigError(f"{HF_CLASS[arch]} slides on every layer; export mixed layer_types as 'olmo3' or "
                              "a Qwen architecture")
        return {"sliding_window": cfg.sliding_window}
    if arch in ("olmo3", "gemma3"):  # a RoPE per layer type: transformers 5's nested rope_parameters
        def params(theta, scaling):
            return {**(scaling or {}), "rope_type": scaling_type(scaling), "rope_theta": theta}

        sliding = cfg.rope_for_layer(types.index("sliding_attention"))
        return {"sliding_window": cfg.sliding_window, "layer_types": types,
                "rope_parameters": {"full_attention": params(cfg.rotary_base, cfg.rope_scaling),
                                    "sliding_attention": params(*sliding)}}
    raise ConfigError(f"{HF_CLASS[arch]} has no sliding-window layers; export as 'olmo3', 'mistral' or a Qwen "
                      "architecture")


# -- tensors --------------------------------------------------------------------------------
def _group_qkv(q, k, v, cfg: GPTConfig) -> torch.Tensor:
    g, d = cfg.num_query_groups, cfg.head_dim
    rest = tuple(q.shape[1:])
    q = q.reshape((g, -1, d) + rest)
    k = k.reshape((g, 1, d) + rest)
    v = v.reshape((g, 1, d) + rest)
    return torch.cat([q, k, v], dim=1).reshape((-1,) + rest).contiguous()


def _ungroup_qkv(qkv, cfg: GPTConfig):
    g, d = cfg.num_query_groups, cfg.head_dim
    hpg = cfg.num_attention_heads // g
    rest = tuple(qkv.shape[1:])
    grouped = qkv.reshape((g, hpg + 2, d) + rest)
    q = grouped[:, :hpg].reshape((-1,) + rest).contiguous()
    k = grouped[:, hpg].reshape((-1,) + rest).contiguous()
    v = grouped[:, hpg + 1].reshape((-1,) + rest).contiguous()
    return q, k, v


def _rope_rows(t: torch.Tensor, heads: int, cfg: GPTConfig, to_ours: bool) -> torch.Tensor:
    """Rows of a q or k projection (weight or bias, ``heads`` heads): GLM's interleaved RoPE
    pairs (2i, 2i+1) among each head's first ``rotary_dim`` rows <-> our rotate-half pairs
    (i, i + r/2). Both sides rotate pair i by the same angle, so q.k is unchanged."""
    if cfg.architecture not in INTERLEAVED_ROPE_ARCHITECTURES:
        return t
    d, r = cfg.head_dim, cfg.rotary_dim
    x = t.reshape((heads, d) + tuple(t.shape[1:]))
    return torch.cat([_pairs_to_halves(x[:, :r], to_ours), x[:, r:]], dim=1).reshape(t.shape).contiguous()


def _pairs_to_halves(rot: torch.Tensor, to_ours: bool) -> torch.Tensor:
    """Rows (dim 1, r of them) of interleaved RoPE pairs (2i, 2i+1) <-> rotate-half pairs
    (i, i + r/2)."""
    if to_ours:
        return torch.cat([rot[:, 0::2], rot[:, 1::2]], dim=1)
    r = rot.shape[1]
    return torch.stack([rot[:, :r // 2], rot[:, r // 2:]], dim=2).reshape(rot.shape)


def hf_to_megatron(hf_sd: Mapping, cfg: GPTConfig, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """HF state dict -> our full (tp=1, pp=1, unpadded) state dict (an image-text checkpoint's
    language model: ``text_model_state_dict``; FP8 block-quantized weights dequantized)."""
    out = {}
    for unit in hf_to_megatron_units(hf_sd, cfg, where):
        out.update(unit)
    return out


def unread_hf_tensors(hf_sd: Mapping, cfg: GPTConfig, where: str = "checkpoint") -> list[str]:
    """The names of ``hf_sd`` a whole conversion never reads (a conversion of meta tensors:
    nothing is read), apart from those the model knowingly leaves out: the
    ``num_nextn_predict_layers`` after the last layer (DeepSeek-V3's / GLM-4.5's
    multi-token-prediction modules), an image-text
    checkpoint's vision tower, rotary ``inv_freq`` buffers of older checkpoints, and a tied
    model's ``lm_head.weight`` (transformers ties it to the embedding too), static activation
    scales of a block-FP8 checkpoint. Anything else would be a weight the model silently drops
    (a bias, a norm of another block, layers past a config's num_hidden_layers): the converter
    and ``--load`` refuse it."""
    from megatron_k15.models.lazy_state_dict import meta_state_dict

    meta = meta_state_dict(hf_sd)
    read = set()

    def recorded(name):
        read.add(name)
        return meta[name]

    hf_to_megatron(LazyStateDict({n: (lambda n=n: recorded(n)) for n in meta}), cfg, where)
    text = text_model_state_dict(meta)
    # the names the text model's view maps (each to its source name); an LM's are its own
    kept = set(meta) if text is meta else {name for name in meta if any(
        name.startswith(old) for old, _ in TEXT_MODEL_PREFIXES) or name == "lm_head.weight"}

    hf_config = cfg.extra.get("hf_config", {})
    # multi-token-prediction layers follow the last one (DeepSeek-V3: 1, GLM-4.5: 1); any other
    # layer past num_hidden_layers means a config that does not describe the weights
    mtp = int(hf_config.get("num_nextn_predict_layers") or 0) if cfg.architecture in DEEPSEEK_MOE_ARCHITECTURES else 0
    # block-FP8 checkpoints with static activation scales: the weights dequantize exactly, the
    # activations stay in bf16 (their scales unused)
    fp8 = (hf_config.get("quantization_config") or {}).get("quant_method") == "fp8"

    def known(name):
        return (name not in kept or cfg.num_layers <= _layer_index(name) < cfg.num_layers + mtp
                or name.endswith("rotary_emb.inv_freq") or (cfg.tie_word_embeddings and name.endswith("lm_head.weight"))
                or (fp8 and name.endswith((".activation_scale", ".input_scale"))))

    return sorted(n for n in meta if n not in read and not known(n))


IGNORE_UNUSED_HINT = "convert with --ignore-unused-tensors"


def check_every_hf_tensor_read(hf_sd: Mapping, cfg: GPTConfig, where: str = "checkpoint",
                               ignore: bool = False, hint: str = IGNORE_UNUSED_HINT) -> list[str]:
    """An ``HFCheckpointError`` naming the ``unread_hf_tensors``, if any (``hint``: what to do
    if they are truly unused); with ``ignore``, they are returned instead (for a warning)."""
    unread = unread_hf_tensors(hf_sd, cfg, where)
    if unread and not ignore:
        shown = ", ".join(unread[:5]) + (f" and {len(unread) - 5} more" if len(unread) > 5 else "")
        raise HFCheckpointError(
            f"{where}: {len(unread)} tensor(s) the {HF_CLASS.get(cfg.architecture, cfg.architecture)} model "
            f"does not use: {shown}. The converted model would compute something other than the checkpoint's "
            f"(transformers only warns of unused weights); if they are truly unused, {hint}")
    return unread


def hf_to_megatron_units(hf_sd: Mapping, cfg: GPTConfig, where: str = "checkpoint", layers: Optional[range] = None,
                         embedding: bool = True, tail: bool = True) -> Iterator[dict]:
    """``hf_to_megatron`` one piece at a time, in layer order: the embedding, each layer, then
    the final norm (and untied output layer). Only a piece's own tensors are read from ``hf_sd``
    (a ``LazyStateDict`` then never holds more than one layer), and each is shape-checked.
    ``layers`` / ``embedding`` / ``tail``: only those pieces (a pipeline stage's)."""
    hf_sd = dequantize_fp8_state_dict(_without_extra_layers(text_model_state_dict(hf_sd), cfg.num_layers),
                                      _fp8_block_size(cfg, where), where)

    def take(name):
        if name not in hf_sd:
            raise HFCheckpointError(f"{where}: tensor {name!r} is missing")
        return hf_sd[name]

    def checked(unit: dict) -> dict:
        for name, t in unit.items():
            expected = expected_shape(name, cfg)
            if tuple(t.shape) != expected:
                raise HFCheckpointError(f"{where}: {name} has shape {tuple(t.shape)}, config implies {expected}")
        return unit

    if embedding:
        yield checked({"embedding.weight": take("model.embed_tokens.weight")})
    for i in range(cfg.num_layers) if layers is None else layers:
        yield checked(_layer_to_megatron(take, hf_sd, i, cfg))
    if tail:
        last = {"final_layernorm.weight": take("model.norm.weight")}
        if not cfg.tie_word_embeddings:
            last["output_layer.weight"] = take("lm_head.weight")
        yield checked(last)


def _layer_to_megatron(take, hf_sd: Mapping, i: int, cfg: GPTConfig) -> dict:
    """Layer ``i``'s tensors under our names."""
    p = f"model.layers.{i}."
    o = f"layers.{i}."
    out = {}
    for ours, theirs in _block_norm_names(cfg):
        out[o + ours] = take(p + theirs)
    a = p + "self_attn."
    if cfg.multi_latent_attention:
        out.update(_mla_to_megatron(take, a, o + "self_attention.", cfg))
        _mlp_to_megatron(take, p, o, i, cfg, hf_sd, out)
        return out
    if cfg.architecture in FUSED_QKV_ARCHITECTURES:  # Phi-3: [q; k; v] in one tensor
        q, k, v = take(a + "qkv_proj.weight").split(
            [cfg.query_projection_size, cfg.kv_projection_size, cfg.kv_projection_size], dim=0)
    else:
        q, k, v = take(a + "q_proj.weight"), take(a + "k_proj.weight"), take(a + "v_proj.weight")
    heads, groups = cfg.num_attention_heads, cfg.num_query_groups
    out[o + "self_attention.linear_qkv.weight"] = _group_qkv(
        _rope_rows(q, heads, cfg, True), _rope_rows(k, groups, cfg, True), v, cfg)
    if cfg.add_qkv_bias:
        out[o + "self_attention.linear_qkv.bias"] = _group_qkv(
            _rope_rows(take(a + "q_proj.bias"), heads, cfg, True),
            _rope_rows(take(a + "k_proj.bias"), groups, cfg, True), take(a + "v_proj.bias"), cfg)
    out[o + "self_attention.linear_proj.weight"] = take(a + "o_proj.weight")
    if cfg.add_attention_output_bias:
        out[o + "self_attention.linear_proj.bias"] = take(a + "o_proj.bias")
    if cfg.attention_sinks:
        out[o + "self_attention.sinks"] = take(a + "sinks")
    if cfg.qk_layernorm:
        out[o + f"self_attention.q_{_qk_norm_name(cfg)}.weight"] = take(a + "q_norm.weight")
        out[o + f"self_attention.k_{_qk_norm_name(cfg)}.weight"] = take(a + "k_norm.weight")
    _mlp_to_megatron(take, p, o, i, cfg, hf_sd, out)
    return out


def _mlp_to_megatron(take, p: str, o: str, layer: int, cfg: GPTConfig, hf_sd: dict, out: dict) -> None:
    """Layer ``layer``'s MLP (HF prefix ``p``, ours ``o``) into ``out``."""
    if cfg.architecture == "gpt_oss":
        out.update(_gpt_oss_experts_to_megatron(take, p + "mlp.", o + "mlp.", hf_sd))
    elif cfg.is_moe_layer(layer):
        out.update(_hf_experts_to_megatron(take, p + "mlp.", o + "mlp.", cfg, hf_sd))
    elif cfg.architecture in FUSED_GATE_UP_ARCHITECTURES:  # [gate; up], as our fc1
        out[o + "mlp.linear_fc1.weight"] = take(p + "mlp.gate_up_proj.weight")
        out[o + "mlp.linear_fc2.weight"] = take(p + "mlp.down_proj.weight")
    else:
        out[o + "mlp.linear_fc1.weight"] = torch.cat(
            [take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")], dim=0)
        out[o + "mlp.linear_fc2.weight"] = take(p + "mlp.down_proj.weight")


def _mla_rope_interleaved(cfg: GPTConfig) -> bool:
    """Whether the HF side lays a head's rope rows out in interleaved pairs (DeepSeek-V3's
    ``rope_interleave``, true for the hub's checkpoints and what we export; V2's always are)."""
    return bool(cfg.extra.get("hf_config", {}).get("rope_interleave", True))


def _rope_tail_to_ours(t: torch.Tensor, groups: int, keep: int, cfg: GPTConfig, to_ours: bool,
                       rope_first: bool) -> torch.Tensor:
    """Rows of ``groups`` blocks [other (keep rows); rope (dr rows, HF's order)] <-> ours: the
    rope rows in rotate-half order, moved first (``rope_first``: a q head, [rope; nope]) or
    left last (the kv down projection, one block: [latent; rope])."""
    dr = cfg.qk_pos_emb_head_dim
    x = t.reshape((groups, keep + dr) + tuple(t.shape[1:]))
    if to_ours:
        other, rope = x[:, :keep], x[:, keep:]
    else:
        rope, other = (x[:, :dr], x[:, dr:]) if rope_first else (x[:, keep:], x[:, :keep])
    if _mla_rope_interleaved(cfg):
        rope = _pairs_to_halves(rope, to_ours)
    parts = [rope, other] if to_ours and rope_first else [other, rope]
    return torch.cat(parts, dim=1).reshape(t.shape).contiguous()


def _mla_to_megatron(take, a: str, o: str, cfg: GPTConfig) -> dict:
    """One layer's multi-latent attention (HF prefix ``a`` = ...self_attn.)."""
    heads = cfg.num_attention_heads

    def q_rows(t):
        return _rope_tail_to_ours(t, heads, cfg.qk_head_dim, cfg, True, rope_first=True)

    out = {}
    if cfg.q_lora_rank:
        out[o + "linear_q_down_proj.weight"] = take(a + "q_a_proj.weight")
        out[o + "q_a_layernorm.weight"] = take(a + "q_a_layernorm.weight")
        out[o + "linear_q_up_proj.weight"] = q_rows(take(a + "q_b_proj.weight"))
    else:
        out[o + "linear_q_proj.weight"] = q_rows(take(a + "q_proj.weight"))
    out[o + "linear_kv_down_proj.weight"] = _rope_tail_to_ours(
        take(a + "kv_a_proj_with_mqa.weight"), 1, cfg.kv_lora_rank, cfg, True, rope_first=False)
    out[o + "kv_a_layernorm.weight"] = take(a + "kv_a_layernorm.weight")
    out[o + "linear_kv_up_proj.weight"] = take(a + "kv_b_proj.weight")
    out[o + "linear_proj.weight"] = take(a + "o_proj.weight")
    return out


def _mla_to_hf(sd: dict, o: str, a: str, cfg: GPTConfig) -> dict:
    """Inverse of ``_mla_to_megatron``."""
    heads = cfg.num_attention_heads

    def q_rows(t):
        return _rope_tail_to_ours(t, heads, cfg.qk_head_dim, cfg, False, rope_first=True)

    out = {}
    if cfg.q_lora_rank:
        out[a + "q_a_proj.weight"] = sd[o + "linear_q_down_proj.weight"]
        out[a + "q_a_layernorm.weight"] = sd[o + "q_a_layernorm.weight"]
        out[a + "q_b_proj.weight"] = q_rows(sd[o + "linear_q_up_proj.weight"])
    else:
        out[a + "q_proj.weight"] = q_rows(sd[o + "linear_q_proj.weight"])
    out[a + "kv_a_proj_with_mqa.weight"] = _rope_tail_to_ours(
        sd[o + "linear_kv_down_proj.weight"], 1, cfg.kv_lora_rank, cfg, False, rope_first=False)
    out[a + "kv_a_layernorm.weight"] = sd[o + "kv_a_layernorm.weight"]
    out[a + "kv_b_proj.weight"] = sd[o + "linear_kv_up_proj.weight"]
    out[a + "o_proj.weight"] = sd[o + "linear_proj.weight"]
    return out


def _without_extra_layers(hf_sd: Mapping, num_layers: int) -> Mapping:
    """The state dict without layers numbered from ``num_layers`` on (DeepSeek-V3's and
    GLM-4.5's multi-token-prediction modules), which the model does not read; nothing is read."""
    extra = [k for k in hf_sd if _layer_index(k) >= num_layers]
    return LazyStateDict.view(hf_sd, {k: k for k in hf_sd if _layer_index(k) < num_layers}) if extra else hf_sd


def _layer_index(name: str) -> int:
    """N of a tensor name's ``layers.N`` component (``model.layers.3.mlp...``: 3); -1 outside layers."""
    parts = name.split(".")
    return next((int(b) for a, b in zip(parts, parts[1:]) if a == "layers" and b.isdigit()), -1)


def _fp8_block_size(cfg: GPTConfig, where: str) -> tuple[int, int]:
    """The (rows, columns) of one FP8 scale block from the config's ``quantization_config``
    (DeepSeek-V3, Kimi K2: fp8 e4m3 in 128 x 128 blocks)."""
    quant = cfg.extra.get("hf_config", {}).get("quantization_config") or {}
    block = quant.get("weight_block_size") or [128, 128]
    if quant and quant.get("quant_method") not in (None, "fp8", "mxfp4"):
        raise HFCheckpointError(f"{where}: quantization_config.quant_method={quant['quant_method']!r} is not "
                                "supported (fp8 block scales, gpt-oss's mxfp4)")
    if len(block) != 2 or min(int(b) for b in block) < 1:
        raise HFCheckpointError(f"{where}: quantization_config.weight_block_size={block!r} must be two positive sizes")
    return int(block[0]), int(block[1])


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                          dtype=torch.bfloat16) -> torch.Tensor:
    """A weight stored as float8 (e4m3) with one fp32 factor per (block[0] x block[1]) tile
    (DeepSeek-V3's ``weight_scale_inv``, the last tiles cut at the edges): w = q * s[i // b0, j // b1]."""
    rows, cols = weight.shape
    tiles = (-(-rows // block[0]), -(-cols // block[1]))
    if weight.dim() != 2 or tuple(scale_inv.shape) != tiles:
        raise HFCheckpointError(f"FP8 weight {tuple(weight.shape)} needs {tiles} scales of {block} blocks, "
                                f"got {tuple(scale_inv.shape)}")
    if weight.is_meta:  # a dry run: the shape is all there is
        return torch.empty(weight.shape, dtype=dtype, device="meta")
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return (weight.float() * scale).to(dtype)


FP8_E4M3_MAX = 448.0  # the largest finite float8 e4m3fn value


def quantize_fp8_blocks(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 e4m3 weight, fp32 ``weight_scale_inv``): ``dequantize_fp8_blocks``' inverse as
    DeepSeek-V3 quantizes, s = amax(|w| of the tile) / 448 per (block[0] x block[1]) tile (the
    last tiles cut at the edges; an all-zero tile gets s = 1), q = e4m3(w / s)."""
    if weight.dim() != 2:
        raise HFCheckpointError(f"FP8 block quantization takes matrices, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    b0, b1 = block
    t0, t1 = -(-rows // b0), -(-cols // b1)
    w = weight.float()
    padded = torch.nn.functional.pad(w.abs(), (0, t1 * b1 - cols, 0, t0 * b0 - rows))
    amax = padded.view(t0, b0, t1, b1).amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax))
    full = scale.repeat_interleave(b0, 0)[:rows].repeat_interleave(b1, 1)[:, :cols]
    return (w / full).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn), scale


def fp8_block_quantized(name: str, tensor: torch.Tensor) -> bool:
    """Whether an exported HF tensor is stored in FP8 blocks: the weight of every linear
    projection inside the layers (attention, dense and expert MLPs; DeepSeek-V3's and Kimi K2's
    hub layout), not the routers, gates, norms, embeddings or output layer."""
    return (_layer_index(name) >= 0 and tensor.dim() == 2
            and name.endswith(("_proj.weight", "_proj_with_mqa.weight")))


def quantize_fp8_state_dict(unit: dict[str, torch.Tensor], block: tuple[int, int]) -> dict[str, torch.Tensor]:
    """An exported piece with its ``fp8_block_quantized`` weights in FP8 blocks, each followed
    by its ``weight_scale_inv``; the other tensors as they are."""
    out = {}
    for name, t in unit.items():
        if fp8_block_quantized(name, t):
            out[name], out[name + "_scale_inv"] = quantize_fp8_blocks(t, block)
        else:
            out[name] = t
    return out


def fp8_quantization_config(cfg: GPTConfig, block: tuple[int, int]) -> dict:
    """The ``quantization_config`` of an FP8-block export: the source checkpoint's when it was
    one (DeepSeek-V3, Kimi K2: kept as it was), else transformers' fine-grained FP8 with
    dynamic activation scales."""
    source = cfg.extra.get("hf_config", {}).get("quantization_config") or {}
    if source.get("quant_method") == "fp8" and list(source.get("weight_block_size") or [128, 128]) == list(block):
        return dict(source)
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}


def dequantize_fp8_state_dict(hf_sd: Mapping, block: tuple[int, int], where: str = "checkpoint") -> Mapping:
    """Every ``X.weight`` with an ``X.weight_scale_inv`` dequantized (``dequantize_fp8_blocks``)
    when it is read, the scales dropped; the state dict as it is without any."""
    scales = [k for k in hf_sd if k.endswith(".weight_scale_inv")]
    if not scales:
        return hf_sd
    loaders = {k: (lambda k=k: hf_sd[k]) for k in hf_sd if not k.endswith(".weight_scale_inv")}
    for key in scales:
        name = key[: -len("_scale_inv")]
        if name not in loaders:
            raise HFCheckpointError(f"{where}: {key} has no weight {name!r}")

        def dequantized(name=name, key=key):
            try:
                return dequantize_fp8_blocks(hf_sd[name], hf_sd[key], block)
            except HFCheckpointError as e:
                raise HFCheckpointError(f"{where}: {name}: {e}") from None
        loaders[name] = dequantized
    return LazyStateDict(loaders)


# e2m1 (FP4) values of the 16 nibble codes; an MXFP4 block is 32 of them (16 bytes, low nibble
# first) sharing one power-of-two scale stored as a biased exponent (127 = 2^0)
FP4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """MXFP4 (OCP microscaling, as gpt-oss ships its experts): ``blocks`` uint8 (..., G, 16),
    ``scales`` uint8 (..., G) -> (..., G * 32) values v = e2m1(code) * 2^(scale - 127)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise HFCheckpointError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if tuple(blocks.shape[:-1]) != tuple(scales.shape) or blocks.shape[-1] != 16:
        raise HFCheckpointError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    lut = torch.tensor(FP4_E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).reshape(*blocks.shape[:-1], 32).long()
    values = torch.ldexp(lut[codes], (scales.to(torch.int32) - 127).unsqueeze(-1))
    return values.reshape(*scales.shape[:-1], scales.shape[-1] * 32).to(dtype)


def _gpt_oss_expert_tensor(take, hf_sd: dict, name: str) -> torch.Tensor:
    """An expert projection in HF's in-memory layout (E, in, out): stored so, or as MXFP4
    blocks / scales of the (E, out, in) matrix (the hub's checkpoints)."""
    if name + "_blocks" in hf_sd:
        dtype = hf_sd[name + "_bias"].dtype if hf_sd[name + "_bias"].is_floating_point() else torch.bfloat16
        return dequantize_mxfp4(take(name + "_blocks"), take(name + "_scales"), dtype).transpose(1, 2)
    return take(name)


def _gpt_oss_experts_to_megatron(take, hf_prefix: str, prefix: str, hf_sd: dict) -> dict:
    """gpt-oss's router and experts: gate and up interleaved along the last axis of
    gate_up_proj (E, h, 2f) become our [gate; up] rows (E, 2f, h); down_proj (E, f, h) -> (E, h, f)."""
    e = hf_prefix + "experts."
    gate_up = _gpt_oss_expert_tensor(take, hf_sd, e + "gate_up_proj")
    gate_up_bias = take(e + "gate_up_proj_bias")
    return {
        prefix + "router.weight": take(hf_prefix + "router.weight"),
        prefix + "router.bias": take(hf_prefix + "router.bias"),
        prefix + "experts.linear_fc1.weight": torch.cat([gate_up[..., 0::2], gate_up[..., 1::2]], -1)
        .transpose(1, 2).contiguous(),
        prefix + "experts.linear_fc1.bias": torch.cat([gate_up_bias[:, 0::2], gate_up_bias[:, 1::2]], -1).contiguous(),
        prefix + "experts.linear_fc2.weight": _gpt_oss_expert_tensor(take, hf_sd, e + "down_proj")
        .transpose(1, 2).contiguous(),
        prefix + "experts.linear_fc2.bias": take(e + "down_proj_bias"),
    }


def _gpt_oss_experts_to_hf(sd: dict, prefix: str, hf_prefix: str) -> dict:
    """Inverse of ``_gpt_oss_experts_to_megatron`` (unquantized)."""
    def interleave(t):  # [gate; up] halves along the last axis -> gate, up, gate, up, ...
        gate, up = t.chunk(2, dim=-1)
        return torch.stack([gate, up], dim=-1).reshape(t.shape).contiguous()

    e = hf_prefix + "experts."
    return {
        hf_prefix + "router.weight": sd[prefix + "router.weight"],
        hf_prefix + "router.bias": sd[prefix + "router.bias"],
        e + "gate_up_proj": interleave(sd[prefix + "experts.linear_fc1.weight"].transpose(1, 2)),
        e + "gate_up_proj_bias": interleave(sd[prefix + "experts.linear_fc1.bias"]),
        e + "down_proj": sd[prefix + "experts.linear_fc2.weight"].transpose(1, 2).contiguous(),
        e + "down_proj_bias": sd[prefix + "experts.linear_fc2.bias"],
    }


def _block_norm_names(cfg: GPTConfig) -> list[tuple[str, str]]:
    """(our name, HF's) of a layer's norms: Llama's post_attention_layernorm is our pre-MLP norm."""
    if cfg.norm_placement == "post":  # OLMo
        return [("post_attention_layernorm.weight", "post_attention_layernorm.weight"),
                ("post_mlp_layernorm.weight", "post_feedforward_layernorm.weight")]
    if cfg.norm_placement == "sandwich" and cfg.architecture == "glm4":  # GLM-4-0414's names
        return [("input_layernorm.weight", "input_layernorm.weight"),
                ("post_attention_layernorm.weight", "post_self_attn_layernorm.weight"),
                ("pre_mlp_layernorm.weight", "post_attention_layernorm.weight"),
                ("post_mlp_layernorm.weight", "post_mlp_layernorm.weight")]
    if cfg.norm_placement == "sandwich":  # Gemma 3
        return [("input_layernorm.weight", "input_layernorm.weight"),
                ("post_attention_layernorm.weight", "post_attention_layernorm.weight"),
                ("pre_mlp_layernorm.weight", "pre_feedforward_layernorm.weight"),
                ("post_mlp_layernorm.weight", "post_feedforward_layernorm.weight")]
    return [("input_layernorm.weight", "input_layernorm.weight"),
            ("pre_mlp_layernorm.weight", "post_attention_layernorm.weight")]


def _qk_norm_name(cfg: GPTConfig) -> str:
    return "norm_all_heads" if cfg.qk_layernorm_scope == "all" else "layernorm"


def _hf_shared_expert(cfg: GPTConfig) -> str:
    """The shared expert's HF module: Qwen2-MoE's ``shared_expert.``, DeepSeek's ``shared_experts.``."""
    return "shared_expert." if cfg.architecture == "qwen2_moe" else "shared_experts."


def _hf_experts_to_megatron(take, hf_prefix: str, prefix: str, cfg: GPTConfig, hf_sd: dict) -> dict:
    """One MoE layer's router (with DeepSeek's score-correction bias), shared expert and stacked
    experts from the hub's per-expert tensors (or from transformers 5's stacked
    ``experts.gate_up_proj`` (E, 2f, h) / ``experts.down_proj`` (E, h, f))."""
    out = {prefix + "router.weight": take(hf_prefix + "gate.weight")}
    if cfg.moe_router_enable_expert_bias:
        out[prefix + "router.expert_bias"] = take(hf_prefix + "gate.e_score_correction_bias")
    if cfg.moe_shared_expert_intermediate_size:
        s = hf_prefix + _hf_shared_expert(cfg)
        out[prefix + "shared_experts.linear_fc1.weight"] = torch.cat(
            [take(s + "gate_proj.weight"), take(s + "up_proj.weight")], dim=0)
        out[prefix + "shared_experts.linear_fc2.weight"] = take(s + "down_proj.weight")
        if cfg.moe_shared_expert_gate:
            out[prefix + "shared_experts.gate_weight"] = take(hf_prefix + "shared_expert_gate.weight")
    stacked = hf_prefix + "experts.gate_up_proj"
    if stacked in hf_sd:
        out[prefix + "experts.linear_fc1.weight"] = take(stacked)
        out[prefix + "experts.linear_fc2.weight"] = take(hf_prefix + "experts.down_proj")
        return out
    e_ = [f"{hf_prefix}experts.{e}." for e in range(cfg.num_moe_experts)]
    out[prefix + "experts.linear_fc1.weight"] = torch.stack(
        [torch.cat([take(q + "gate_proj.weight"), take(q + "up_proj.weight")], dim=0) for q in e_])
    out[prefix + "experts.linear_fc2.weight"] = torch.stack([take(q + "down_proj.weight") for q in e_])
    return out


def megatron_to_hf(sd: Mapping, cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Our full state dict -> HF names (inverse of ``hf_to_megatron``)."""
    out = {}
    for unit in megatron_to_hf_units(sd, cfg):
        out.update(unit)
    return out


def megatron_to_hf_units(sd: Mapping, cfg: GPTConfig) -> Iterator[dict]:
    """``megatron_to_hf`` one piece at a time (the embedding, each layer, the final norm and
    output layer), reading only that piece's names from ``sd``."""
    yield {"model.embed_tokens.weight": sd["embedding.weight"]}
    for i in range(cfg.num_layers):
        yield _layer_to_hf(sd, i, cfg)
    tail = {"model.norm.weight": sd["final_layernorm.weight"]}
    if not cfg.tie_word_embeddings:
        tail["lm_head.weight"] = sd["output_layer.weight"]
    yield tail


def _layer_to_hf(sd: Mapping, i: int, cfg: GPTConfig) -> dict:
    """Inverse of ``_layer_to_megatron``."""
    p = f"model.layers.{i}."
    o = f"layers.{i}."
    out = {}
    for ours, theirs in _block_norm_names(cfg):
        out[p + theirs] = sd[o + ours]
    if cfg.multi_latent_attention:
        out.update(_mla_to_hf(sd, o + "self_attention.", p + "self_attn.", cfg))
        _mlp_to_hf(sd, o, p, i, cfg, out)
        return out
    heads, groups = cfg.num_attention_heads, cfg.num_query_groups
    q, k, v = _ungroup_qkv(sd[o + "self_attention.linear_qkv.weight"], cfg)
    q, k = _rope_rows(q, heads, cfg, False), _rope_rows(k, groups, cfg, False)
    if cfg.architecture in FUSED_QKV_ARCHITECTURES:
        out[p + "self_attn.qkv_proj.weight"] = torch.cat([q, k, v], dim=0)
    else:
        out.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                    p + "self_attn.v_proj.weight": v})
    if cfg.add_qkv_bias:
        q, k, v = _ungroup_qkv(sd[o + "self_attention.linear_qkv.bias"], cfg)
        out.update({p + "self_attn.q_proj.bias": _rope_rows(q, heads, cfg, False),
                    p + "self_attn.k_proj.bias": _rope_rows(k, groups, cfg, False),
                    p + "self_attn.v_proj.bias": v})
    out[p + "self_attn.o_proj.weight"] = sd[o + "self_attention.linear_proj.weight"]
    if cfg.add_attention_output_bias:
        out[p + "self_attn.o_proj.bias"] = sd[o + "self_attention.linear_proj.bias"]
    if cfg.attention_sinks:
        out[p + "self_attn.sinks"] = sd[o + "self_attention.sinks"]
    if cfg.qk_layernorm:
        out[p + "self_attn.q_norm.weight"] = sd[o + f"self_attention.q_{_qk_norm_name(cfg)}.weight"]
        out[p + "self_attn.k_norm.weight"] = sd[o + f"self_attention.k_{_qk_norm_name(cfg)}.weight"]
    _mlp_to_hf(sd, o, p, i, cfg, out)
    return out


def _mlp_to_hf(sd: dict, o: str, p: str, layer: int, cfg: GPTConfig, out: dict) -> None:
    """Inverse of ``_mlp_to_megatron``."""
    if cfg.architecture == "gpt_oss":
        out.update(_gpt_oss_experts_to_hf(sd, o + "mlp.", p + "mlp."))
    elif cfg.is_moe_layer(layer):
        out[p + "mlp.gate.weight"] = sd[o + "mlp.router.weight"]
        if cfg.moe_router_enable_expert_bias:
            out[p + "mlp.gate.e_score_correction_bias"] = sd[o + "mlp.router.expert_bias"]
        if cfg.moe_shared_expert_intermediate_size:
            gate, up = sd[o + "mlp.shared_experts.linear_fc1.weight"].chunk(2, dim=0)
            s = p + "mlp." + _hf_shared_expert(cfg)
            out.update({s + "gate_proj.weight": gate.contiguous(), s + "up_proj.weight": up.contiguous(),
                        s + "down_proj.weight": sd[o + "mlp.shared_experts.linear_fc2.weight"]})
            if cfg.moe_shared_expert_gate:
                out[p + "mlp.shared_expert_gate.weight"] = sd[o + "mlp.shared_experts.gate_weight"]
        fc1, fc2 = sd[o + "mlp.experts.linear_fc1.weight"], sd[o + "mlp.experts.linear_fc2.weight"]
        for e in range(cfg.num_moe_experts):
            gate, up = fc1[e].chunk(2, dim=0)
            q = f"{p}mlp.experts.{e}."
            out.update({q + "gate_proj.weight": gate.contiguous(), q + "up_proj.weight": up.contiguous(),
                        q + "down_proj.weight": fc2[e].contiguous()})
    elif cfg.architecture in FUSED_GATE_UP_ARCHITECTURES:
        out[p + "mlp.gate_up_proj.weight"] = sd[o + "mlp.linear_fc1.weight"]
        out[p + "mlp.down_proj.weight"] = sd[o + "mlp.linear_fc2.weight"]
    else:
        gate, up = sd[o + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out[p + "mlp.gate_proj.weight"] = gate.contiguous()
        out[p + "mlp.up_proj.weight"] = up.contiguous()
        out[p + "mlp.down_proj.weight"] = sd[o + "mlp.linear_fc2.weight"]


def expected_shape(name: str, cfg: GPTConfig) -> tuple[int, ...]:
    h = cfg.hidden_size
    qkv = cfg.query_projection_size + 2 * cfg.kv_projection_size
    dqk = cfg.qk_head_dim + cfg.qk_pos_emb_head_dim
    table = {
        "input_layernorm.weight": (h,), "pre_mlp_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,), "post_mlp_layernorm.weight": (h,),
        "self_attention.q_norm_all_heads.weight": (cfg.query_projection_size,),
        "self_attention.sinks": (cfg.num_attention_heads,),
        "self_attention.linear_proj.bias": (h,),
        "mlp.router.bias": (cfg.num_moe_experts,),
        "mlp.experts.linear_fc1.bias": (cfg.num_moe_experts, 2 * (cfg.moe_ffn_hidden_size or 0)),
        "mlp.experts.linear_fc2.bias": (cfg.num_moe_experts, h),
        "self_attention.k_norm_all_heads.weight": (cfg.kv_projection_size,),
        "self_attention.linear_qkv.weight": (qkv, h), "self_attention.linear_qkv.bias": (qkv,),
        "self_attention.linear_proj.weight": (h, cfg.value_projection_size),
        "self_attention.linear_q_proj.weight": (cfg.num_attention_heads * dqk, h),
        "self_attention.linear_q_down_proj.weight": (cfg.q_lora_rank or 0, h),
        "self_attention.q_a_layernorm.weight": (cfg.q_lora_rank or 0,),
        "self_attention.linear_q_up_proj.weight": (cfg.num_attention_heads * dqk, cfg.q_lora_rank or 0),
        "self_attention.linear_kv_down_proj.weight": (cfg.kv_lora_rank + cfg.qk_pos_emb_head_dim, h),
        "self_attention.kv_a_layernorm.weight": (cfg.kv_lora_rank,),
        "self_attention.linear_kv_up_proj.weight": (cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim),
                                                    cfg.kv_lora_rank),
        "self_attention.q_layernorm.weight": (cfg.head_dim,),
        "self_attention.k_layernorm.weight": (cfg.head_dim,),
        "mlp.linear_fc1.weight": (2 * cfg.ffn_hidden_size, h),
        "mlp.linear_fc2.weight": (h, cfg.ffn_hidden_size),
        "mlp.router.weight": (cfg.num_moe_experts, h),
        "mlp.router.expert_bias": (cfg.num_moe_experts,),
        "mlp.shared_experts.linear_fc1.weight": (2 * (cfg.moe_shared_expert_intermediate_size or 0), h),
        "mlp.shared_experts.linear_fc2.weight": (h, cfg.moe_shared_expert_intermediate_size or 0),
        "mlp.shared_experts.gate_weight": (1, h),
        "mlp.experts.linear_fc1.weight": (cfg.num_moe_experts, 2 * (cfg.moe_ffn_hidden_size or 0), h),
        "mlp.experts.linear_fc2.weight": (cfg.num_moe_experts, h, cfg.moe_ffn_hidden_size or 0),
    }
    if name in ("embedding.weight", "output_layer.weight"):
        return (cfg.vocab_size, h)
    if name == "final_layernorm.weight":
        return (h,)
    return table[name.split(".", 2)[2]]


# tensors that stay fp32 whatever the weights' dtype (DeepSeek's router bias, which chooses
# experts by small differences; transformers keeps it fp32 too)
FP32_TENSOR_SUFFIXES = ("router.expert_bias", "gate.e_score_correction_bias")


def cast_state_dict(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor in ``dtype`` (--target-dtype), but those of ``FP32_TENSOR_SUFFIXES``."""
    return {k: v if k.endswith(FP32_TENSOR_SUFFIXES) else v.to(dtype) for k, v in sd.items()}


# -- files ----------------------------------------------------------------------------------
def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, HF_CONFIG_FILE)
    if not os.path.isfile(path):
        raise HFCheckpointError(f"{path}: not found (is --hf-dir an HF model directory?)")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise HFCheckpointError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


def read_hf_state_dict(hf_dir: str) -> Mapping:
    """The tensors of an HF checkpoint, each read when asked for: one ``model.safetensors`` or
    an indexed sharded set (``.bin`` files memory-mapped when in torch's zip format, read with
    ``weights_only=True``)."""
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    single = os.path.join(hf_dir, "model.safetensors")
    if os.path.isfile(index):
        return SafetensorsFiles(safetensors_index_files(index))
    if os.path.isfile(single):
        return SafetensorsFiles([single])
    bins = sorted(f for f in os.listdir(hf_dir) if f.startswith("pytorch_model") and f.endswith(".bin"))
    if bins:
        sd = {}
        for name in bins:
            sd.update(load_torch_file(os.path.join(hf_dir, name)))
        return sd
    raise HFCheckpointError(f"{hf_dir}: no model.safetensors, safetensors index or pytorch_model*.bin found")


class HFShardWriter:
    """Writes tensors as they come into safetensors files of at most ``max_shard_bytes`` (a
    shard is flushed when the next tensor would overflow it), then the index: memory holds one
    shard. One file is named ``model.safetensors``; several ``model-0000i-of-0000n`` with
    ``model.safetensors.index.json``, as ``save_pretrained`` writes them."""

    def __init__(self, out_dir: str, max_shard_bytes: int = 5 * 2**30):
        self.out_dir, self.max_shard_bytes = out_dir, max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[str, list[str], int]] = []  # (temporary file, names, bytes)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = os.path.join(self.out_dir, f".shard-{len(self.written):05d}.safetensors")
        save_file(self.pending, path, metadata={"format": "pt"})
        self.written.append((path, sorted(self.pending), self.pending_bytes))
        self.pending, self.pending_bytes = {}, 0

    def abort(self) -> None:
        """Removes the files written so far (after an error)."""
        for path, _, _ in self.written:
            if os.path.exists(path):
                os.remove(path)
        self.written, self.pending, self.pending_bytes = [], {}, 0

    def close(self) -> int:
        """Names the files and writes the index; returns the number of tensors written."""
        if self.pending or not self.written:
            self._flush()
        n = len(self.written)
        if n == 1:
            os.replace(self.written[0][0], os.path.join(self.out_dir, "model.safetensors"))
            return len(self.written[0][1])
        weight_map, total = {}, 0
        for i, (path, names, nbytes) in enumerate(self.written):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(path, os.path.join(self.out_dir, fname))
            weight_map.update({name: fname for name in names})
            total += nbytes
        with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
        return len(weight_map)


def write_hf_state_dict(sd: Mapping, out_dir: str, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write safetensors, split into shards with an index when larger than ``max_shard_bytes``."""
    writer = HFShardWriter(out_dir, max_shard_bytes)
    try:
        for name in sorted(sd):
            writer.add(name, sd[name])
        writer.close()
    except BaseException:
        writer.abort()
        raise
