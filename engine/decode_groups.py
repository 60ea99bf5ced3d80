"""How decode rows are cut into attention groups: a pure policy over context lengths.

CPU attention runs one ``scaled_dot_product_attention`` per group over a padded
``(rows, longest)`` key block, so a group costs ``rows × longest`` position-rows of work
plus a fixed overhead per call (the gathers, the call, the copy out: per layer). One group
for a mixed batch pays up to 2× in padding (contexts 128 and 512 in one group: the short
rows read 4× their length); one group per row pays the overhead 32 times. The split that
minimises ``Σ rows·longest + groups·GROUP_OVERHEAD`` over the rows sorted by length is
found exactly by a small dynamic programme (rows ≤ max_num_seqs, O(n²)).
"""

from __future__ import annotations

import itertools

# Position-rows of padded attention work that one more group costs (measured here: a
# group's fixed cost per layer is ~30-40 µs, a position-row ~0.1 µs in fp32).
GROUP_OVERHEAD = 384


def group_by_context(lengths: list[int], overhead: int = GROUP_OVERHEAD) -> list[tuple[int, int]]:
    """``[start, end)`` row ranges of ``lengths`` (sorted ascending, each the padded
    length a row needs) that minimise padded work plus ``overhead`` per group."""
    n = len(lengths)
    if any(a > b for a, b in itertools.pairwise(lengths)):
        raise ValueError("lengths must be sorted ascending")
    best = [0] + [0] * n  # best[end]: least cost of rows [0, end)
    cut = [0] * (n + 1)  # cut[end]: where the last group of that best split starts
    for end in range(1, n + 1):
        longest = lengths[end - 1]
        best[end], cut[end] = min(
            (best[start] + (end - start) * longest + overhead, start) for start in range(end)
        )
    groups: list[tuple[int, int]] = []
    end = n
    while end > 0:
        groups.append((cut[end], end))
        end = cut[end]
    return groups[::-1]
