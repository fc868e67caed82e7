"""What vLLM's int4 kernels accept (group sizes, feature multiples): pure rules the plan checks before anything
is quantized, and the quantizer obeys."""
from __future__ import annotations

from emq.errors import EmqError

# Group sizes every vLLM int4 kernel we target takes: Marlin {32, 64, 128}, Machete {64, 128} (Marlin
# serves 32 on Hopper), CPUWNA16 any even size. Larger wins: fewer scales, faster kernels.
GROUP_SIZES = (128, 64, 32)
# CPUWNA16 needs in- and out-features (per tensor-parallel shard) that are multiples of 32.
FEATURE_MULTIPLE = 32


def choose_group_size(in_features: list[int], out_features: list[int],
                      requested: int | None) -> tuple[int, str]:
    """The group size for a model's quantized Linears, and why.

    Auto (`requested` None): the largest of 128/64/32 that divides every in-feature. An explicit value
    must be one of 128/64/32 and divide every in-feature. Every in- and out-feature must be a multiple
    of 32 either way (vLLM's CPU kernel needs it).

    Args:
        in_features: in-features of the Linears to quantize. When `out_features` has the same length,
            the two lists are read as pairs (one Linear each) so that errors can name a module shape.
        out_features: out-features of the Linears to quantize.
        requested: the user's `quant.group_size`, or None for automatic.

    Returns:
        (group size, a one-line human reason).

    Raises:
        EmqError: a feature is not a multiple of 32, or the requested size is unsupported or does not
            divide an in-feature; the message names `quant.group_size` and the values that would work.
    """
    ins = sorted({int(f) for f in in_features})
    outs = sorted({int(f) for f in out_features})
    if not ins:
        raise ValueError("choose_group_size needs at least one in-feature")
    if len(in_features) == len(out_features):
        shapes = [(int(o), int(i)) for i, o in zip(in_features, out_features)]
    else:
        shapes = [(None, i) for i in ins] + [(o, None) for o in outs]
    bad = [(o, i) for o, i in shapes
           if (i is not None and i % FEATURE_MULTIPLE) or (o is not None and o % FEATURE_MULTIPLE)]
    if bad:
        o, i = bad[0]
        shape = f"out×in = {o if o is not None else '?'}×{i if i is not None else '?'}"
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise EmqError(
            f"W4A16 cannot quantize a Linear of shape {shape}{more}: its features must be multiples of "
            f"{FEATURE_MULTIPLE} (vLLM's CPU kernel CPUWNA16 needs in- and out-features that are multiples "
            f"of {FEATURE_MULTIPLE}; Marlin on CUDA only runs such shapes padded); no quant.group_size helps",
            fix="keep that module in 16-bit (add its name to quant.ignore), or serve unquantized (quant=none)")

    works = [g for g in GROUP_SIZES if all(i % g == 0 for i in ins)]
    listed = ", ".join(str(i) for i in ins)
    if requested is None:
        g = works[0]  # 32 always works here: every feature is a multiple of 32
        skipped = [c for c in GROUP_SIZES if c > g]
        if skipped:
            blockers = [i for i in ins if i % skipped[-1]]
            why = f"{skipped[-1]} does not divide in-feature {blockers[0]}"
            return g, f"group size {g} (auto): {why}; {g} divides every in-feature ({listed})"
        return g, f"group size {g} (auto): the largest supported size; divides every in-feature ({listed})"

    requested = int(requested)
    if requested not in GROUP_SIZES:
        raise EmqError(
            f"quant.group_size={requested} is not a group size the vLLM int4 kernels take "
            f"(Marlin: 32/64/128, Machete: 64/128, CPUWNA16: even sizes)",
            fix=f"set quant.group_size to one of {works} (or leave it unset to choose automatically)")
    blockers = [i for i in ins if i % requested]
    if blockers:
        raise EmqError(
            f"quant.group_size={requested} does not divide in-feature {blockers[0]} "
            f"({blockers[0]} / {requested} = {blockers[0] / requested:g}); every quantized Linear's "
            f"in-features must be a whole number of groups",
            fix=f"set quant.group_size to one of {works} (or leave it unset to choose automatically)")
    return requested, f"group size {requested} (requested): divides every in-feature ({listed})"
