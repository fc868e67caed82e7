"""The route: serve the base, serve the LoRA, merge then serve, or stop."""
from __future__ import annotations


from emq.detect import DetectResult
from emq.errors import EmqError
from emq.plan.types import Route
from emq.schema import MemoryConfig, QuantMethod, RoutePolicy


# Below this, a "not trained in 4-bit" verdict does not justify skipping the merge.
MIN_CONFIDENCE = 0.5


# merged + in-flight bnb of a QLoRA adapter: NF4 re-quantization of dequant(NF4(W)) + s·B·A rounds the update away
BNB_ERASES = ("merged + in-flight bnb re-quantizes dequant(NF4(W)) + s·B·A to NF4, which rounds a fine-tune's small "
              "update back to the base's codes (the demo good doctor on an H200: merged + bnb keeps 7% of the "
              "fine-tune, KL to the trained function 0.97 vs 1.04 for the base with no adapter, while the LoRA on the "
              "in-flight bnb base keeps 99.8%, KL 0.002; benchmarks/results/qlora_bnb_erasure.md)")


def choose_route(det: DetectResult, memory: MemoryConfig, reasons: list[str], *, prequantized: bool,
                 qm: QuantMethod = QuantMethod.none, compensated: bool = False) -> Route:
    """How the adapter reaches the engine, before asking whether a merge can run here (`merge_cascade`).

    Args:
        det: the detect record.
        memory: the memory policy (route).
        reasons: the plan's reasons, appended to.
        prequantized: the base is a bitsandbytes 4-bit checkpoint (emq cannot merge into it).
        compensated: w4a16 with quant.compensation.rank: the adapter is served as a LoRA (with the compensation).

    Returns:
        serve-base, serve-lora or merge-then-serve.

    Raises:
        EmqError: vLLM cannot serve this LoRA, and the route cannot be a merge.
    """
    if det.adapter is None:
        reasons.append("route: serve-base, because the model config has no adapter")
        return Route.serve_base
    blockers = det.adapter.vllm_lora_blockers
    if prequantized:
        if blockers:
            raise EmqError(f"the base {det.base.ref} is pre-quantized (4-bit), so emq cannot merge, and vLLM "
                           f"cannot serve this LoRA: {'; '.join(blockers)}",
                           "use the base's 16-bit original as model.base")
        reasons.append("route: serve-lora, because the base is a pre-quantized 4-bit checkpoint (emq merges "
                       "into 16-bit weights only); vLLM applies the LoRA on the 4-bit base")
        return Route.serve_lora
    if memory.route is RoutePolicy.lora:
        if blockers:
            raise EmqError(f"memory.route=lora but {'; '.join(blockers)}", "use memory.route=merge or auto")
        reasons.append("route: serve-lora, because memory.route=lora")
        return Route.serve_lora
    if memory.route is RoutePolicy.merge:
        reasons.append("route: merge-then-serve, because memory.route=merge")
        if qm is QuantMethod.bnb and det.trained_in_4bit:
            reasons.append(f"WARNING: {BNB_ERASES}; the LoRA on the in-flight bnb base (memory.route=auto) serves "
                           "NF4(W) + the adapter, the trained function itself")
        return Route.merge_then_serve
    if compensated and not blockers:
        reasons.append("route: serve-lora, because quant.compensation.rank serves the adapter's update and the "
                       "compensation of the base's W4A16 error as one LoRA on the W4A16 base (the update is never "
                       "rounded)")
        return Route.serve_lora
    if qm is QuantMethod.bnb and det.trained_in_4bit and not blockers:
        reasons.append(f"route: serve-lora on the in-flight bnb base, because the adapter was trained on a 4-bit base "
                       f"({det.decided_by}) and {BNB_ERASES}; NF4(W) + the adapter is the trained function itself")
        return Route.serve_lora
    return _auto_route(det, reasons)


def _auto_route(det: DetectResult, reasons: list[str]) -> Route:
    """memory.route=auto: serve the LoRA only when 16-bit training is well evidenced and vLLM can serve it."""
    assert det.adapter is not None
    blockers = det.adapter.vllm_lora_blockers
    if det.trained_in_4bit is False and det.confidence >= MIN_CONFIDENCE and not blockers:
        reasons.append(f"route: serve-lora, because the adapter was trained on a 16-bit base "
                       f"({det.decided_by}): vLLM applies it to the base it was trained on, with no merge "
                       "time or disk")
        return Route.serve_lora
    why = ("the adapter was trained on a 4-bit base" if det.trained_in_4bit
           else "; ".join(blockers) if blockers
           else f"16-bit training is only weakly evidenced (confidence {det.confidence:.2f} < "
                f"{MIN_CONFIDENCE}; a merge is exact either way)")
    reasons.append(f"route: merge-then-serve, because {why} ({det.decided_by or 'no evidence'}); a merged "
                   "checkpoint served 1.23x the tokens/s of the same adapter as a LoRA on the bf16 base, "
                   "1.16x with bnb (H200, 7B-shaped, benchmarks/results/lora_vs_bnb_h200.md)")
    return Route.merge_then_serve
