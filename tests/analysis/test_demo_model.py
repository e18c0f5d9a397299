"""The shipped ``memlens-demo`` model shows the memory mechanisms MemLens is about.

These tests hold the trained weights to their promise: a previous-token head, an induction head
and in-context learning on repeated random tokens (TransformerLens battery: no BOS, a random
segment of 50 tokens repeated twice, 16 sequences, fixed seed). An untrained placeholder in
``analysis/weights/memlens-demo`` fails the first three; that is what they are for.
"""

from __future__ import annotations

import pytest

from analysis.heads import model_head_scores
from analysis.models import DEMO_DIR, DEMO_MODEL
from analysis.store import ArrayStore

SEG_LEN, N_SEQS, SEED = 50, 16, 0
MIN_HEAD_SCORE = 0.8
MAX_LOSS_RATIO = 0.25
MAX_WEIGHTS_BYTES = 10_000_000


@pytest.fixture(scope="module")
def battery(tmp_path_factory):
    """The demo model's head scores, computed once for this module in a private cache."""
    store = ArrayStore(tmp_path_factory.mktemp("demo-cache"), 2**30)
    yield model_head_scores(DEMO_MODEL, seg_len=SEG_LEN, n_seqs=N_SEQS, seed=SEED, store=store)
    store.close()


def test_demo_model_has_an_induction_head(battery):
    layer, head, score = battery.best("induction")

    assert score >= MIN_HEAD_SCORE, f"best induction head L{layer}H{head} scores {score:.3f}"


def test_demo_model_has_a_previous_token_head(battery):
    layer, head, score = battery.best("previous_token")

    assert score >= MIN_HEAD_SCORE, f"best previous-token head L{layer}H{head} scores {score:.3f}"


def test_demo_model_predicts_the_repeated_half_from_memory(battery):
    # Mean loss on tokens seg_len + 1 .. 2 * seg_len - 1 over that on tokens 1 .. seg_len - 1.
    assert battery.loss_ratio <= MAX_LOSS_RATIO, f"loss ratio {battery.loss_ratio:.3f}"


def test_demo_weights_stay_small_enough_for_the_repository():
    size = sum(path.stat().st_size for path in DEMO_DIR.rglob("*") if path.is_file())

    assert size <= MAX_WEIGHTS_BYTES, f"{DEMO_DIR} holds {size:,} bytes"
