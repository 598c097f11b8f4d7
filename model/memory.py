"""What one rank holds under a layout, computed from a config.json alone (no weights loaded).

For a Mixtral with P parameters, of which P_e sit in the experts and P_d = P − P_e elsewhere, trained on
N ranks with expert-parallel size ep (expert-data-parallel size N/ep) and ZeRO stage s, one rank holds

    weights     s < 3: P_d + P_e/ep                     s = 3: (P_d + P_e)/N
    gradients   s < 2: T_d + T_e/ep                     s ≥ 2: (T_d + T_e)/N
                plus the LM head's gradient, which the fused loss computes whole in the forward and keeps
                for the backward: V·hidden in fp32 (and its 16-bit cast for bf16/fp16), until it is reduced
    optimizer   s = 0: T_d + T_e/ep                     s ≥ 1: (T_d + T_e)/N      (× state bytes)
    step        s = 1, 2: the largest optimizer group's gradient partition once more (max(T_d, T_e)/N under
                EP, (T_d + T_e)/N without): DeepSpeed's step flattens each group's gradients into a new
                buffer while the contiguous gradient buffer still holds them (stage_1_and_2.py `step`)
    gathered    s = 3: the largest set of parameters gathered at once: two decoder layers without EP (the
                current and the prefetched next one: `stage3_max_live_parameters`, model/distributed.py),
                one under EP, each with its dense weights and E/ep experts; under EP at least one layer's
                experts whole (3·E·hidden·ffn), which AutoEP gathers once while converting the layer; and
                at least the embedding or LM head (V·hidden), each gathered whole

where T are the trainable parameters (all of them, or the LoRA adapters: then T ≈ 0 next to P).
QLoRA (`quantized`): the attention weights P_a and the experts are stored in NF4 (`NF4_BYTES` ≈ 0.516 bytes
per weight with double quantization), the rest in the training dtype: P_d − P_a + (P_a + P_e/ep)·0.516, plus,
as "gathered", one expert's gate-up projection dequantized while it computes (model/quantize.py).
Bytes: weights and gradients in the training dtype (2 for bf16, 4 for fp32); optimizer state per
trainable parameter: AdamW 8 (m, v in fp32), SGD 0, plus 4 for the fp32 master copy of the partition
(bf16/fp16; for an fp32 model too under ZeRO-1/2, whose optimizer always copies; under ZeRO-3 an fp32
model's partitions are the master weights: model/distributed.py `fp32_master_shared`). The step's
flattened gradient is in the training dtype, plus its fp32 copy for bf16/fp16.
Activations are not counted here (they depend on the batch: `activation_bytes`). The step's buffer and the
activations never coexist (the backward has freed the activations before the optimizer step), so a rank's
peak counts the larger of the two (train/plan.py, train/preflight.py).

Mixtral-8x7B (46.7 B parameters, 45.1 B in experts) in bf16 with AdamW on 8 ranks, for example:
ZeRO-3 + EP 8: (2 + 2 + 12)·46.7e9/8 ≈ 93 GB per rank, which is why the 8x7B full fine-tuning recipe
needs 16 GPUs or optimizer offload, while LoRA under ZeRO-3 holds 2·46.7e9/8 ≈ 11.7 GB of weights.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Layout:
    world: int = 1
    zero_stage: int = 0
    ep_size: int = 1
    dtype_bytes: int = 4
    optimizer: str = "adamw"       # adamw | sgd
    lora: bool = False
    offload_optimizer: bool = False
    offload_params: bool = False
    quantized: bool = False        # model.quantize=nf4: attention and expert weights in NF4 (QLoRA)


NF4_BYTES = (4 + 8 / 64 + 32 / (64 * 256)) / 8  # per weight: 4-bit codes, 8-bit block scales, their fp32 scales


def parameter_counts(config) -> dict:
    """Parameters of a Mixtral config in experts, elsewhere, and in its largest layer's experts."""
    h, f, e = config.hidden_size, config.intermediate_size, config.num_local_experts
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    attn = h * head_dim * (config.num_attention_heads * 2 + config.num_key_value_heads * 2)
    layer_experts = e * 3 * h * f
    layer_dense = attn + h * e + 2 * h
    embed = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    experts = config.num_hidden_layers * layer_experts
    dense = config.num_hidden_layers * layer_dense + embed + h
    return {"total": experts + dense, "experts": experts, "dense": dense, "attention": config.num_hidden_layers * attn,
            "layer_experts": layer_experts, "layer_dense": layer_dense}


def per_rank_bytes(config, layout: Layout, checkpointing: bool = True) -> dict:
    """Bytes one rank holds for weights, gradients, optimizer states and ZeRO-3 gathers (formulas above).
    Offloaded parts are counted under `host` instead of `device`. Without gradient checkpointing a ZeRO-3
    rank keeps every layer's gathered weights from its forward to its backward (autograd saves views of
    them): all decoder layers, with E/ep experts each, instead of two."""
    c = parameter_counts(config)
    n, s, ep, b = layout.world, layout.zero_stage, layout.ep_size, layout.dtype_bytes
    local = c["dense"] + c["experts"] / ep           # what a rank owns without ZeRO sharding
    shard = c["total"] / n                            # what it owns under full sharding
    trainable = 0.0 if layout.lora else 1.0           # adapters are small next to the base
    weights = (shard if s == 3 else local) * b
    if layout.quantized:  # QLoRA (ZeRO 0-2; EP under ZeRO 0-1): attention and experts in NF4, the rest in the compute dtype
        weights = (c["dense"] - c["attention"]) * b + (c["attention"] + c["experts"] / ep) * NF4_BYTES
    grads = (shard if s >= 2 else local) * b * trainable
    head = config.vocab_size * config.hidden_size
    if not layout.lora:  # the fused loss (model/losses.py) computes the LM head's gradient whole in the forward,
        grads += head * (4 + (b if b < 4 else 0))  # in fp32 (+ its 16-bit cast), beside the partitioned buffers
    # an fp32 master copy of the partition: bf16/fp16, and fp32 under ZeRO-1/2 (not ZeRO-3: see above)
    state = (8 if layout.optimizer == "adamw" else 0) + (4 if b < 4 or s in (1, 2) else 0)
    optim = (shard if s >= 1 else local) * state * trainable
    step = 0.0
    if s in (1, 2):  # DeepSpeed's step flattens the largest group's gradient partition anew (see above)
        group = (max(c["dense"], c["experts"]) if ep > 1 else c["total"]) / n
        step = group * (b + (4 if b < 4 else 0)) * trainable
    gathered = 0.0
    if layout.quantized:  # the expert kernel dequantizes one expert's projection at a time (gate_up: 2·ffn·hidden)
        gathered = c["layer_experts"] / config.num_local_experts * 2 / 3 * b
    if s == 3:  # stage3_max_live_parameters (model/distributed.py): two layers, one under EP
        gathered = (2 if ep == 1 else 1) * (c["layer_experts"] / ep + c["layer_dense"]) * b
        if ep > 1:  # AutoEP gathers each layer's experts whole once, while converting it
            gathered = max(gathered, c["layer_experts"] * b)
        if not checkpointing:
            gathered = max(gathered, config.num_hidden_layers * (c["layer_experts"] / ep + c["layer_dense"]) * b)
        gathered = max(gathered, head * b)  # the embedding and the LM head are gathered whole
    out = {"weights": weights, "gradients": grads, "optimizer": optim, "step": step, "gathered": gathered}
    out["host"] = (optim if layout.offload_optimizer else 0.0) + (weights if layout.offload_params else 0.0)
    out["device"] = weights + grads + optim + step + gathered - out["host"]
    out["total"] = weights + grads + optim + step + gathered
    return out


def peak_bytes(state: dict, transient: float) -> float:
    """A rank's peak on its device: `per_rank_bytes`'s device part with the step's buffer replaced by the larger
    of it and `transient` (activations + all-to-all): the backward has freed the activations before the step."""
    return state["device"] - state["step"] + max(state["step"], transient)


def gib(x: float) -> str:
    return f"{x / 2**30:.1f} GiB"


def activation_bytes(config, tokens: int, dtype_bytes: int, checkpointing: bool, dpo: bool = False) -> float:
    """Activations one rank keeps for the backward of a micro-batch of `tokens` tokens (an estimate).

    Per token and decoder layer (b bytes per element; attention through SDPA / flash attention, so no
    S×S scores are kept; k experts per token, ffn width f, key/value width kv):
        attention   b · (6·hidden + 2·kv)                 norm output, q, k, v, attention output, residual
        MoE         b · k · (hidden + 4·f) + 4 · E         each routed copy: input, gate, up, act(gate)·up; fp32 router logits
    With gradient checkpointing only each layer's input (b · hidden) is kept, plus one layer recomputed whole.
    Plus the fused loss head (model/losses.py): the final hidden states and their gradient (2 · b · hidden per
    token), and one chunk of ~4M logits in fp32 with its softmax (2 · 4 · chunk · V; + b · chunk · V for the
    gradient cast to a 16-bit dtype).
    DPO takes its answer log-probs through the same head in chunks (model/losses.py `linear_logps`: the selected
    hidden rows are kept instead of logits, counted in the 2 · b · hidden), and its reference forward (no grad,
    adapters off or a live reference) runs while the policy's activations are kept: one more layer's activations
    (counted for a precomputed reference too, where it over-counts by that layer).
    """
    h, f, k, e = config.hidden_size, config.intermediate_size, config.num_experts_per_tok, config.num_local_experts
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    layer = dtype_bytes * (6 * h + 2 * kv) + dtype_bytes * k * (h + 4 * f) + 4 * e
    layers = config.num_hidden_layers
    kept = layers * dtype_bytes * h + layer if checkpointing else layers * layer
    chunk_logits = max(16, (1 << 22) // config.vocab_size) * config.vocab_size
    head = tokens * 2 * dtype_bytes * h + chunk_logits * (8 + (dtype_bytes if dtype_bytes < 4 else 0))
    if dpo:
        head += tokens * layer
    return tokens * kept + head


def alltoall_bytes(config, tokens: int, dtype_bytes: int, ep_size: int) -> float:
    """AutoEP's dispatch and combine buffers for one MoE layer: each routed copy of a token (k per token) is
    sent to its expert's rank and its output sent back: 2 · k · tokens · hidden elements (0 without EP)."""
    if ep_size <= 1:
        return 0.0
    return 2.0 * config.num_experts_per_tok * tokens * config.hidden_size * dtype_bytes
