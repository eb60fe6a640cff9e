"""Tests of calibration/stream.py (and readers.open_stream / load_data over streams): the DataStream
over a GroupData, a memory-mapped .npz, a Dataset through a DataLoader with workers, a DataLoader,
an iterable; groups given beside the samples, a transform, labels optional; a bad sample named by
its index. Fine-tuning from a stream is tested in test_finetune_data.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fixtures_models import ItemsDataset
from fqexport.calibration.readers import open_stream
from fqexport.errors import DataError


# ------------------------------------------------------------------------- the stream


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_x_is_memory_mapped_and_batches_match_the_arrays(tmp_path, mlp_data, compressed):
    path = tmp_path / "t.npz"
    (np.savez_compressed if compressed else np.savez)(path, x=mlp_data.x, y=mlp_data.y, group=mlp_data.group)
    stream = open_stream(path)
    assert isinstance(stream._reader.x, np.memmap)
    assert not stream.in_memory and stream.sample_shape == mlp_data.x.shape[1:]
    np.testing.assert_array_equal(stream.y, mlp_data.y)
    sub = stream.subset(np.arange(100, 300))
    (x, y, g), = sub.batches([np.array([7, 0, 199])])
    np.testing.assert_array_equal(x, mlp_data.x[[107, 100, 299]])
    np.testing.assert_array_equal(g, mlp_data.group[[107, 100, 299]])


def test_npz_with_nan_fails_at_open_naming_the_sample(tmp_path, mlp_data):
    x = mlp_data.x.copy()
    x[123, 0] = np.nan
    path = tmp_path / "bad.npz"
    np.savez(path, x=x, y=mlp_data.y, group=mlp_data.group)
    with pytest.raises(DataError, match=r"bad\.npz: sample 123: field 'x' contains NaN or Inf \(1 values\)"):
        open_stream(path)


@pytest.mark.parametrize("workers", [0, 2])
def test_dataset_light_pass_gives_the_readers_labels_and_groups(mlp_data, workers):
    stream = open_stream(ItemsDataset(mlp_data), num_workers=workers)
    assert stream.group_names == mlp_data.group_names
    np.testing.assert_array_equal(stream.y, mlp_data.y)
    np.testing.assert_array_equal(stream.group, mlp_data.group)
    batches = [np.array([5, 1]), np.array([399, 0, 17])]
    for (x, _, _), idx in zip(stream.batches(batches, workers), batches):
        np.testing.assert_array_equal(x, mlp_data.x[idx])


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_item_in_a_streamed_batch_names_its_index(mlp_data, workers):
    nan_x = torch.full(mlp_data.x.shape[1:], float("nan"))
    stream = open_stream(ItemsDataset(mlp_data, bad={250: (nan_x, 0, "group0")}, declare=True))
    with pytest.raises(DataError, match=r"<ItemsDataset>: sample 250: field 'x' contains NaN or Inf"):
        list(stream.batches([np.arange(0, 64), np.arange(240, 260)], workers))
    unknown = (torch.zeros(mlp_data.x.shape[1:]), int(mlp_data.y[301]), "martians")
    stream = open_stream(ItemsDataset(mlp_data, bad={301: unknown}, declare=True))
    with pytest.raises(DataError, match=r"holds the name 'martians' \(sample 301\) that is not in group_names"):
        list(stream.batches([np.arange(290, 310)], workers))




# ------------------------------------------------------------------------- your own data: forms


class PairsDataset(torch.utils.data.Dataset):
    """(x, y) items of a GroupData (no group), counting the items read."""

    def __init__(self, data):
        self.data, self.reads = data, 0

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        self.reads += 1
        return torch.from_numpy(self.data.x[i]), int(self.data.y[i])


class Batches:
    """A re-iterable of (x, y) batches of 32 in order (a plain iterable: its y of 32 labels says batch)."""

    def __init__(self, data):
        self.data = data

    def __iter__(self):
        for s in range(0, len(self.data), 32):
            yield torch.from_numpy(self.data.x[s:s + 32]), torch.from_numpy(self.data.y[s:s + 32])


def test_dataset_of_pairs_with_groups_as_an_array_matches_the_group_data(mlp_data):
    stream = open_stream(PairsDataset(mlp_data), groups=mlp_data.group)
    np.testing.assert_array_equal(stream.y, mlp_data.y)
    np.testing.assert_array_equal(stream.group, mlp_data.group)
    np.testing.assert_array_equal(stream.take([9, 2]).x, mlp_data.x[[9, 2]])


def test_dataloader_is_read_through_its_dataset_whatever_its_sampler(mlp_data):
    ds = PairsDataset(mlp_data)
    loader = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True)
    stream = open_stream(loader, groups=mlp_data.group)
    assert stream.source == "<DataLoader of PairsDataset>"
    np.testing.assert_array_equal(stream.y, mlp_data.y)
    np.testing.assert_array_equal(stream.take([399, 0]).x, mlp_data.x[[399, 0]])


def _x_only_loader(data):
    """A DataLoader with its own collate_fn (so it is iterated as it is) yielding x-only batches."""
    return torch.utils.data.DataLoader([torch.from_numpy(x) for x in data.x], batch_size=32,
                                       collate_fn=lambda items: torch.stack(items))


@pytest.mark.parametrize("labels", [True, False])
def test_iterable_of_batches_is_read_in_passes_in_any_order(mlp_data, labels):
    source = Batches(mlp_data) if labels else _x_only_loader(mlp_data)
    stream = open_stream(source, groups=mlp_data.group)
    assert (stream.y is not None) == labels and len(stream) == len(mlp_data)
    if labels:
        np.testing.assert_array_equal(stream.y, mlp_data.y)
    lists = [np.array([399, 3]), np.array([3, 40, 41]), np.array([], dtype=np.int64), np.array([0])]
    got = [x for x, _, _ in stream.batches(lists)]
    assert len(got) == len(lists)
    for x, idx in zip(got, lists):
        np.testing.assert_array_equal(x, mlp_data.x[idx])


def test_a_shuffled_dataloader_with_its_own_collate_is_refused(mlp_data):
    loader = torch.utils.data.DataLoader(PairsDataset(mlp_data), batch_size=32, shuffle=True,
                                         collate_fn=lambda items: torch.utils.data.default_collate(items))
    with pytest.raises(DataError, match=r"^<DataLoader of PairsDataset>: a DataLoader with shuffle=True and its "
                                        r"own collate_fn yields its samples in another order every pass"):
        open_stream(loader, groups=mlp_data.group)


def test_a_group_function_sees_each_sample_of_a_batch_as_an_item(mlp_data):
    seen = []
    stream = open_stream(_x_only_loader(mlp_data), groups=lambda i, x: seen.append(tuple(x.shape)) or i % 2)
    assert seen == [mlp_data.x.shape[1:]] * len(mlp_data) and stream.group.tolist() == [i % 2 for i in range(400)]


def test_x_alone_has_no_labels_and_needs_groups(mlp_data):
    xs = [torch.from_numpy(x) for x in mlp_data.x[:10]]
    stream = open_stream(xs, groups=lambda i, x: "odd" if i % 2 else "even")
    assert stream.y is None and stream.group_names == ("even", "odd")
    assert stream.take().y is None and stream.take().x.shape == (10, mlp_data.x.shape[1])
    with pytest.raises(DataError, match=r"^<list>: the samples carry no group: yield \(x, y, group\), or give groups="):
        open_stream(xs)


def test_transform_runs_per_sample_of_a_dataset_and_per_batch_of_an_iterable(mlp_data):
    calls = []

    def double(x):
        calls.append(tuple(x.shape))
        return x * 2

    stream = open_stream(PairsDataset(mlp_data), groups=mlp_data.group, transform=double)
    np.testing.assert_allclose(stream.take([5]).x, mlp_data.x[[5]] * 2)
    assert set(calls) == {(1, mlp_data.x.shape[1])}  # each sample as a batch of one
    calls.clear()
    stream = open_stream(Batches(mlp_data), groups=mlp_data.group, transform=double)
    np.testing.assert_allclose(stream.take([33]).x, mlp_data.x[[33]] * 2)
    assert set(calls) == {(32, mlp_data.x.shape[1]), (len(mlp_data) % 32, mlp_data.x.shape[1])}  # each batch


def test_bad_samples_are_named_by_index_before_anything_is_returned(mlp_data):
    items = [(torch.from_numpy(x), int(y)) for x, y in zip(mlp_data.x[:300], mlp_data.y[:300])]
    items[257] = (torch.zeros(7), 0)
    with pytest.raises(DataError, match=r"^<list>: sample 257: field 'x' has shape \(7,\) but sample 0 has"):
        open_stream(items, groups=mlp_data.group[:300])
    items[257] = (torch.from_numpy(mlp_data.x[0]), 0)
    with pytest.raises(DataError, match=r"^<list>: sample 12: transform failed: ValueError: no"):
        open_stream(items, groups=mlp_data.group[:300],
                    transform=lambda x: (_ for _ in ()).throw(ValueError("no")) if x[0, 0] == mlp_data.x[12, 0] else x)
    with pytest.raises(DataError, match=r"^<list>: sample 0: field 'x' contains NaN or Inf"):
        open_stream(items, groups=mlp_data.group[:300], transform=lambda x: x * float("nan"))
    with pytest.raises(DataError, match=r"^<list>: sample 0: field 'group' holds the negative id -1; ids start at 0"):
        open_stream(items, groups=np.full(300, -1))
    class Named(list):  # a dataset naming its group ids: an id beyond them is unknown
        group_names = ("a", "b")

    with pytest.raises(DataError, match=r"^<Named>: sample 7: field 'group' holds the id 5 but group_names has only 2"):
        open_stream(Named([(x, 0, 5 if i == 7 else 1) for i, (x, _) in enumerate(items)]))
    with pytest.raises(DataError, match=r"^<generator>: an iterator can be read only once"):
        open_stream(x for x in items)


def test_an_iterable_that_changes_between_passes_is_named(mlp_data):
    class Shrinking:
        passes = 0

        def __iter__(self):
            Shrinking.passes += 1
            n = 100 if Shrinking.passes <= 3 else 50  # the checks (one-shot, batches) and the light pass see 100
            return iter([(torch.from_numpy(mlp_data.x[i]), int(mlp_data.y[i]), int(mlp_data.group[i]))
                         for i in range(n)])

    stream = open_stream(Shrinking())
    with pytest.raises(DataError, match=r"^<Shrinking>: this pass yielded 50 samples but the first pass yielded 100"):
        stream.take([80])


def test_a_list_of_batches_is_read_like_any_iterable_of_batches(mlp_data):
    """A plain list is the simplest re-iterable: its (x [B], y [B], group [B]) items are batches."""
    batches = [(mlp_data.x[s:s + 32], mlp_data.y[s:s + 32], mlp_data.group[s:s + 32])
               for s in range(0, len(mlp_data.y), 32)]
    stream = open_stream(batches)
    assert len(stream.y) == len(mlp_data.y)
    np.testing.assert_array_equal(stream.y, mlp_data.y)
    np.testing.assert_array_equal(stream.group, mlp_data.group)
    np.testing.assert_array_equal(stream.take([40, 3]).x, mlp_data.x[[40, 3]])
    # a list of samples stays a list of samples
    samples = [(mlp_data.x[i], int(mlp_data.y[i]), int(mlp_data.group[i])) for i in range(10)]
    assert len(open_stream(samples).y) == 10


@pytest.mark.parametrize("kind", ["dataset", "dataloader", "iterable"])
def test_integer_group_ids_with_a_gap_stream_as_the_groups_they_name(mlp_data, kind):
    """Items' group ids 1 and 5 (Fitzpatrick types, say) are the groups 'group1' and 'group5', as in
    an .npz; every later batch read the raw ids as positions into those names (survey 75: "holds
    the id 5 but group_names has only 2 names", or "its group is 1 in this pass but was 0")."""
    ids = np.where(mlp_data.group == 1, 5, 1)
    items = [(torch.from_numpy(mlp_data.x[i]), int(mlp_data.y[i]), int(ids[i])) for i in range(len(ids))]

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return len(items)

        def __getitem__(self, i):
            return items[i]

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(items)

    source = {"dataset": Items(), "dataloader": torch.utils.data.DataLoader(Items(), batch_size=64),
              "iterable": Stream()}[kind]
    stream = open_stream(source)
    assert stream.group_names == ("group1", "group5")
    np.testing.assert_array_equal(stream.group, mlp_data.group)
    batches = [np.arange(0, 64), np.arange(len(ids) - 50, len(ids))]
    for (x, _, g), idx in zip(stream.batches(batches), batches):
        np.testing.assert_array_equal(x, mlp_data.x[idx])
        np.testing.assert_array_equal(g, mlp_data.group[idx])


def test_an_iterable_dataset_of_batches_is_read_as_batches(mlp_data):
    """survey 75: an IterableDataset yielding (x [B], y [B], group [B]) -- and DataLoader(it,
    batch_size=None), PyTorch's idiom for one -- were read as samples and refused ("field 'y' must
    be a single number"); the rule for any other iterable is its first element's y."""
    class Batched(torch.utils.data.IterableDataset):
        def __iter__(self):
            for s in range(0, len(mlp_data.y), 64):
                yield mlp_data.x[s:s + 64], mlp_data.y[s:s + 64], mlp_data.group[s:s + 64]

    for source in (Batched(), torch.utils.data.DataLoader(Batched(), batch_size=None)):
        stream = open_stream(source)
        np.testing.assert_array_equal(stream.y, mlp_data.y)
        np.testing.assert_array_equal(stream.group, mlp_data.group)
        np.testing.assert_array_equal(stream.take([130, 5]).x, mlp_data.x[[130, 5]])


def test_an_iterable_datasets_own_failure_names_the_sample_it_reached(mlp_data):
    """survey 75: a shard that cannot be read escaped as a bare OSError, naming no source or sample."""
    class Failing(torch.utils.data.IterableDataset):
        def __iter__(self):
            for i in range(len(mlp_data.y)):
                if i == 70:
                    raise OSError("shard-0003.tar: No such file")
                yield torch.from_numpy(mlp_data.x[i]), int(mlp_data.y[i]), int(mlp_data.group[i])

    with pytest.raises(DataError, match=r"^<Failing>: sample 70 cannot be read: OSError: shard-0003\.tar: No such file$"):
        open_stream(Failing())


def test_samples_with_a_one_element_label_beside_one_channel_are_samples():
    """survey 78: (x [1, 8, 8], tensor([y]), group) items of an IterableDataset were read as batches
    of one (len(y) == len(x) == 1), dropping the channel axis; a batch of one is not told from
    them, and samples are what such items are."""
    rng = np.random.default_rng(0)
    items = [(torch.from_numpy(rng.normal(size=(1, 8, 8)).astype(np.float32)), torch.tensor([i % 3]), i % 2)
             for i in range(24)]

    class Gray(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(items)

    stream = open_stream(Gray())
    assert stream.sample_shape == (1, 8, 8) and len(stream.y) == 24
    np.testing.assert_array_equal(stream.y, np.arange(24) % 3)
