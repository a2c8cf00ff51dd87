"""Loader modes (deterministic, split over processes without overlap, resumable) and shard ordering."""

import json

import numpy as np
import pytest
import torch
from test_train import losses, train

from pgolf.data.shard_order import score_shards, unigram_kl
from pgolf.formats.results import write_result
from pgolf.formats.shards import list_shards, load_shard
from pgolf.formats.tensorfile import save
from pgolf.model.gpt import GPT
from pgolf.train.loader import DistributedLoader

CPU = torch.device("cpu")


def batches(ds, mode, rank=0, world=1, n=5, seed=3, order=None, seqs=4, seq_len=16):
    loader = DistributedLoader(ds.dataset_dir, rank, world, CPU, {"mode": mode}, seq_len, seed, order)
    return [loader.next_batch(seqs, seq_len) for _ in range(n)], loader


@pytest.mark.parametrize("mode", ["sequential", "shuffled", "ordered"])
def test_two_ranks_split_the_one_process_batch_without_overlap(tiny_dataset, mode):
    order = list(range(len(list_shards(tiny_dataset.dataset_dir, "train"))))[::-1]
    one, _ = batches(tiny_dataset, mode, seqs=8, order=order)
    r0, _ = batches(tiny_dataset, mode, 0, 2, order=order)
    r1, _ = batches(tiny_dataset, mode, 1, 2, order=order)
    for (x, y), (x0, _), (x1, _) in zip(one, r0, r1, strict=True):
        assert torch.equal(torch.cat([x0, x1]), x) if mode == "shuffled" else x.shape == (8, 16)
        assert not any(torch.equal(a, b) for a in x0 for b in x1)
        assert torch.equal(x[:, 1:], y[:, :-1])


def test_shuffled_is_seeded_and_resumes_exactly(tiny_dataset):
    a, loader = batches(tiny_dataset, "shuffled", n=3, seed=1)
    b, _ = batches(tiny_dataset, "shuffled", n=3, seed=2)
    assert not torch.equal(a[0][0], b[0][0])
    state = loader.stream.state()
    after = [loader.next_batch(4, 16) for _ in range(40)]  # runs past an epoch of this small set
    resumed = DistributedLoader(tiny_dataset.dataset_dir, 0, 1, CPU, {"mode": "shuffled"}, 16, 1)
    resumed.stream.load_state(state)
    for (x, _), (x2, _) in zip(after, [resumed.next_batch(4, 16) for _ in range(40)], strict=True):
        assert torch.equal(x, x2)


def test_ordered_mode_reads_the_shards_in_the_given_order(tiny_dataset):
    files = list_shards(tiny_dataset.dataset_dir, "train")
    order = list(range(len(files)))[::-1]
    (x, _), = batches(tiny_dataset, "ordered", n=1, order=order)[0]
    first = np.asarray(load_shard(files[order[0]])[:16], dtype=np.int64)
    assert torch.equal(x[0], torch.from_numpy(first))
    with pytest.raises(ValueError, match="not a permutation"):
        batches(tiny_dataset, "ordered", order=[0, 0])


def test_shard_scores_spread_and_correlation(tiny_dataset, tmp_path):
    torch.manual_seed(0)
    model = GPT(tiny_dataset.vocab_size, tiny_dataset.config["model"] | {"num_layers": 1, "model_dim": 32,
                                                                         "num_heads": 2, "num_kv_heads": 1})
    save(tmp_path / "probe.pgt", model.state_dict(), model.meta())
    r = score_shards(tiny_dataset.dataset_dir, tmp_path / "probe.pgt", {"sample_tokens": 512, "seq_len": 16},
                     tiny_dataset.vocab_size)
    probe = [s["probe_loss"] for s in r["shards"]]
    assert len(probe) == len(list_shards(tiny_dataset.dataset_dir, "train"))
    assert r["hardest_first"] == sorted(range(len(probe)), key=lambda i: -probe[i])
    assert r["probe_loss_spread"] == max(probe) - min(probe) and -1 <= r["correlation"] <= 1
    same = np.ones(10)
    assert unigram_kl(same, same * 3) == pytest.approx(0) and unigram_kl(np.eye(10)[0] * 50, same) > 0.5


def test_training_follows_the_shard_order(tiny_dataset, tmp_path):
    order = tmp_path / "shard_order.json"
    n = len(list_shards(tiny_dataset.dataset_dir, "train"))
    write_result(order, {"hardest_first": list(range(n))[::-1], "easiest_first": list(range(n))})
    seq = train(tiny_dataset, tmp_path / "seq")
    easy = train(tiny_dataset, tmp_path / "easy", loader='{"mode": "ordered", "order": "easiest"}', order=order)
    hard = train(tiny_dataset, tmp_path / "hard", loader='{"mode": "ordered", "order": "hardest"}', order=order)
    assert seq.returncode == easy.returncode == hard.returncode == 0
    assert losses(tmp_path / "seq") == losses(tmp_path / "easy")  # name order = easiest_first here
    assert losses(tmp_path / "hard") != losses(tmp_path / "seq")


def test_loader_private_memory_stays_flat_over_many_shards(tmp_path, capsys):
    """25 shards of 4 MB (links to one file) cost no more private memory than one: mapped, never copied."""
    from pgolf.formats.shards import write_shard
    from pgolf.train.loader import bench_cli

    shard = tmp_path / "shard.bin"
    sha = write_shard(shard, np.random.default_rng(0).integers(0, 1024, 2_000_000))
    for n in (1, 25):
        (tmp_path / str(n)).mkdir()
        names = [f"fineweb_train_{i:06d}.bin" for i in range(n)]
        for name in names:
            (tmp_path / str(n) / name).symlink_to(shard)
        splits = {"train": {"shards": names, "tokens": 2_000_000 * n, "sha256": [sha] * n},
                  "val": {"shards": [], "tokens": 0, "sha256": []}}
        manifest = {"vocab_size": 1024, "tokenizer_sha256": "0" * 64, "splits": splits}
        (tmp_path / str(n) / "manifest.json").write_text(json.dumps(manifest))
    args = ["--seq-len", "1024", "--batch-seqs", "8", "--batches", "100", "--modes", "sequential", "shuffled"]
    bench_cli(["--data", str(tmp_path / "1"), *args])
    bench_cli(["--data", str(tmp_path / "25"), *args])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all("tokens/s" in line for line in lines)
    private = [float(line.rsplit("private ", 1)[1].split()[0].replace(",", "")) for line in lines]
    assert max(private[2:]) < max(private[:2]) + 20  # MB; copying the 25 shards would take 100
