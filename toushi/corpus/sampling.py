"""Scene-balanced sampling and the held-out split, both keyed on hashes of ids.

A hash rank instead of ``random.sample``: a post's chance to be picked and its split depend only on its
own id and the seed, so adding or editing other posts never reshuffles the rest.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def unit_hash(*parts: object) -> float:
    """A number in [0, 1) fixed by the parts."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(post_id: str, heldout_fraction: float) -> str:
    """'heldout' or 'train', from the id alone (not the seed: changing the seed must not leak eval posts)."""
    return "heldout" if unit_hash("split", post_id) < heldout_fraction else "train"


def sample_per_scene(items: Sequence[T], *, key: Callable[[T], str], scene: Callable[[T], str],
                     per_scene: int | None, max_posts: int | None, seed: int) -> list[T]:
    """Up to ``per_scene`` items per scene (lowest seeded hash of the key), then a scene-balanced cap.

    The cap takes items round-robin over scenes (rank 1 of every scene, then rank 2, ...), so a cap
    below the total still covers as many scenes as possible. Output order: by scene, then rank.
    """
    by_scene: dict[str, list[T]] = defaultdict(list)
    for it in items:
        by_scene[scene(it)].append(it)
    ranked = {s: sorted(group, key=lambda it: unit_hash("sample", seed, key(it)))[:per_scene]
              for s, group in sorted(by_scene.items())}
    if max_posts is None:
        return [it for group in ranked.values() for it in group]
    picked: list[tuple[str, int, T]] = []
    depth = 0
    while len(picked) < max_posts and any(len(g) > depth for g in ranked.values()):
        # Which scenes get the last places of a partial round is seeded too, not alphabetical.
        round_scenes = sorted((s for s, g in ranked.items() if len(g) > depth),
                              key=lambda s: unit_hash("round", seed, depth, s))
        for s in round_scenes[: max_posts - len(picked)]:
            picked.append((s, depth, ranked[s][depth]))
        depth += 1
    picked.sort(key=lambda t: (t[0], t[1]))
    return [it for _, _, it in picked]
