"""Online-code MDL: known answers (labels independent of the hidden states compress to ~1; clean
labels compress far better than noisy ones), the first block's uniform code, whole chunks on one
side of every cut, the label-frequency fallback, and any family's fit."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tokenprobe.probes import mdl
from tokenprobe.probes.linear import LinearProbe
from tokenprobe.probes.mdl import PORTIONS, family_fit, online_code_length


def _problem(n=4000, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.linspace(0.5, 3, d) + 1
    s = (x - 1) / torch.linspace(0.5, 3, d) @ torch.randn(d, generator=g) / math.sqrt(d)
    return x, s, g


def _linear_fit(x, y, groups, seed):
    return LinearProbe().fit(x, y, groups=groups, seed=seed)


def test_labels_independent_of_the_hidden_states_do_not_compress():
    x, _, g = _problem()
    y = torch.rand(len(x), generator=g) < 0.5
    result = online_code_length(_linear_fit, x, y, groups=torch.arange(len(x)) // 8, seed=0)
    assert result["uniform_bits"] == len(x)
    assert 0.8 < result["compression"] <= 1.05


def test_clean_labels_compress_far_better_than_noisy_ones():
    x, s, g = _problem()
    groups = torch.arange(len(x)) // 8
    clean = online_code_length(_linear_fit, x, s > 0, groups=groups, seed=0)
    noisy = online_code_length(_linear_fit, x, s + 0.7 * torch.randn(len(x), generator=g) > 0, groups=groups, seed=0)
    assert clean["compression"] > 4
    assert 1.1 < noisy["compression"] < clean["compression"] / 2
    assert clean["codelength_bits"] < noisy["codelength_bits"]


def test_the_first_block_is_its_uniform_code_and_the_blocks_add_up():
    x, s, _ = _problem(n=3000)
    result = online_code_length(_linear_fit, x, s > 0, seed=5)
    sizes, bits = result["block_sizes"], result["block_bits"]
    assert result["block_codes"][0] == "uniform" and bits[0] == sizes[0] == 3  # 0.001 * 3000 rows, 1 bit each
    assert sizes == [3, 3, 6, 12, 24, 48, 91, 188, 375, 750, 1500]  # the portions (187.5 -> 187), one row a chunk
    assert sum(sizes) == result["rows"] == 3000
    assert result["codelength_bits"] == pytest.approx(sum(bits))
    assert result["compression"] == pytest.approx(3000 / result["codelength_bits"])
    json.dumps(result, allow_nan=False)


def test_chunks_stay_whole_and_each_block_is_coded_by_a_probe_of_the_rows_before_it():
    """A spy family: x[:, 0] is the row's index, so what each fit saw and what each probe coded is known."""
    n = 1000
    rows = torch.arange(n)
    groups = rows // 7
    y = (rows % 3 == 0).float()
    x = torch.stack([rows.float(), torch.zeros(n)], 1)
    seen = []

    class Spy:
        def __init__(self, trained):
            self.trained = trained

        def predict_proba(self, hidden):
            seen.append((self.trained, hidden[:, 0].long()))
            return torch.full((len(hidden),), 0.25)

    def fit(x_train, y_train, groups_train, seed):
        trained = x_train[:, 0].long()
        assert seed == 9 and torch.equal(groups_train, groups[trained]) and torch.equal(y_train, y[trained])
        return Spy(trained)

    result = online_code_length(fit, x, y, groups=groups, seed=9)
    assert len(seen) == len(result["block_sizes"]) - 1 and result["block_codes"][1:] == ["probe"] * len(seen)
    coded = set()
    first = None
    for trained, block in seen:
        first = first if first is not None else set(trained.tolist())
        assert set(trained.tolist()) == first | coded  # everything sent before, nothing else
        assert not set(groups[trained].tolist()) & set(groups[block].tolist())  # no chunk on both sides
        coded |= set(block.tolist())
    assert len(first) == result["block_sizes"][0] and first | coded == set(range(n))
    for (trained, block), bits in zip(seen, result["block_bits"][1:], strict=True):
        positives = int(y[block].sum())
        assert bits == pytest.approx(-positives * math.log2(0.25) - (len(block) - positives) * math.log2(0.75))
    # the order is the seed's: the same seed gives the same order, another seed another one
    orders = {s: mdl._chunk_order(groups, s)[0] for s in (9, 10)}
    assert not torch.equal(orders[9], orders[10]) and torch.equal(orders[9], mdl._chunk_order(groups, 9)[0])


def test_blocks_after_one_class_use_the_label_frequency_code():
    n = 2000
    x, _, _ = _problem(n=n, d=8)
    y = torch.zeros(n, dtype=torch.bool)
    y[torch.tensor([5, 900, 1500, 1999])] = True  # so rare that the first blocks follow negatives only

    def fit(x_train, y_train, groups_train, seed):
        assert 0 < y_train.sum() < len(y_train)  # never asked to fit one class
        return LinearProbe().fit(x_train, y_train, groups=groups_train, seed=seed)

    result = online_code_length(fit, x, y, seed=1)
    ordered = y[mdl._chunk_order(torch.arange(n), 1)[0]]
    start = 0
    frequency_blocks = 0
    for size, bits, code in zip(result["block_sizes"], result["block_bits"], result["block_codes"], strict=True):
        before, block = ordered[:start], ordered[start:start + size]
        if code == "label-frequency":
            frequency_blocks += 1
            assert not before.any() or before.all()
            p1 = (int(before.sum()) + 1) / (start + 2)
            positives = int(block.sum())
            assert bits == pytest.approx(-positives * math.log2(p1) - (size - positives) * math.log2(1 - p1))
        start += size
    assert frequency_blocks >= 1
    assert result["compression"] > 5  # rare positives: the uniform code is a poor baseline


def test_any_family_fits_through_the_registry():
    x, s, _ = _problem(n=1500, d=16)
    groups = torch.arange(1500) // 5
    linear = online_code_length(family_fit("linear"), x, s > 0, groups=groups, seed=0)
    also_linear = online_code_length(family_fit(LinearProbe), x, s > 0, groups=groups, seed=0)
    assert linear == also_linear
    small = online_code_length(family_fit("mlp", width=32, max_epochs=5, select="log_loss"), x, s > 0,
                               groups=groups, seed=0)
    assert small["compression"] > 1.5 and small["block_codes"][-1] == "probe"


@pytest.mark.parametrize("portions", [(0.5,), (0.5, 0.25, 1.0), (0.0, 1.0), (0.5, 1.5)])
def test_bad_portions_and_labels_are_refused(portions):
    x, s, _ = _problem(n=100, d=4)
    with pytest.raises(ValueError, match="portions"):
        online_code_length(_linear_fit, x, s > 0, portions=portions)
    with pytest.raises(ValueError, match="binary"):
        online_code_length(_linear_fit, x, s.round())
    assert PORTIONS[-1] == 1.0
