"""Calibration and GPTQ on a briefly trained model: Hessians from hooks, and GPTQ beating round-to-nearest."""

import time

import pytest
import torch
import torch.nn.functional as F

from pgolf.config import ConfigError, validate
from pgolf.formats import tensorfile
from pgolf.model.gpt import GPT
from pgolf.quant.calibrate import calibrate, calibration_tokens, collect_hessians, generate, train_windows
from pgolf.quant.clip import row_scales
from pgolf.quant.gptq import gptq_codes, output_error
from pgolf.quant.rtn import dequantize_rows, rtn_matrix

CFG = validate({"model": {"num_layers": 2, "model_dim": 64, "num_heads": 2, "num_kv_heads": 1},
                "calibrate": {"seqs": 16, "seq_len": 64, "batch_seqs": 8}})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: on a shared CPU two OpenMP threads make these small ops many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    """A model trained for 30 Adam steps on the tiny train shards, saved as the pipeline saves EMA weights."""
    torch.manual_seed(0)
    model = GPT(tiny_dataset.vocab_size, CFG["model"])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    data = train_windows(tiny_dataset.dataset_dir, 30 * 8, 65, seed=1)
    for step in range(30):
        batch = data[step * 8 : (step + 1) * 8]
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("gptq") / "ema.pgt"
    tensorfile.save(path, model.state_dict(), model.meta())
    return model.eval(), path


def test_hessians_cover_every_matrix_and_the_tied_head(trained, tiny_dataset, tmp_path):
    model, path = trained
    hessians = calibrate(path, tiny_dataset.dataset_dir, CFG["calibrate"], 3, tmp_path / "h.pgt", torch.device("cpu"))
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(hessians) == linears | {"tok_emb.weight"}
    state = model.state_dict()
    for name, h in hessians.items():
        assert h.shape == (state[name].size(1),) * 2, name
        torch.testing.assert_close(h, h.T)
        assert float(torch.linalg.eigvalsh(h.double()).min()) > -1e-5
    tokens = train_windows(tiny_dataset.dataset_dir, 16, 64, seed=3)
    with torch.no_grad():
        x = model.head_input(tokens).reshape(-1, 64)
    torch.testing.assert_close(hessians["tok_emb.weight"], x.T @ x / len(x), rtol=1e-4, atol=1e-6)
    saved, meta = tensorfile.load(tmp_path / "h.pgt")
    assert meta["source"] == "train" and meta["tokens"] == 16 * 64 and set(saved) == set(hessians)


def test_head_input_is_what_the_tied_head_multiplies(trained):
    model, _ = trained
    idx = torch.randint(0, model.vocab_size, (2, 16))
    with torch.no_grad():
        logits = F.linear(model.head_input(idx), model.tok_emb.weight)
        cap = model.cfg["logit_softcap"]
        torch.testing.assert_close(model(idx), cap * torch.tanh(logits / cap))


@pytest.mark.parametrize("bits,clip", [(6, "quantile"), (6, "sdclip"), (5, "quantile")])
def test_gptq_beats_round_to_nearest_on_every_layer(trained, tiny_dataset, bits, clip):
    model, _ = trained
    hessians = collect_hessians(model, train_windows(tiny_dataset.dataset_dir, 16, 64, seed=5), 8)
    cfg = {**CFG["quant"], "clip": clip, "clip_quantile": 1.0}
    state = model.state_dict()
    for name, h in hessians.items():
        w = state[name]
        scale = row_scales(w, bits, cfg, "attn")
        rtn = output_error(w, dequantize_rows(rtn_matrix(w, scale, bits, None, cfg), scale), h)
        gptq = output_error(w, dequantize_rows(gptq_codes(w, h, scale, bits, 32, 0.01, True), scale), h)
        assert gptq < rtn, f"{name}: GPTQ {gptq:.3e} vs RTN {rtn:.3e}"


def test_gptq_orders_and_blocks_do_not_break_it():
    torch.manual_seed(0)
    x = torch.randn(512, 48) * torch.linspace(0.1, 3, 48)
    x[:, 7] = 0  # a dead input column
    h, w = x.T @ x / 512, torch.randn(16, 48)
    scale = row_scales(w, 4, {**CFG["quant"], "clip": "quantile", "clip_quantile": 1.0}, "attn")
    rtn = output_error(w, dequantize_rows(rtn_matrix(w, scale, 4, None, {}), scale), h)
    for block, act_order in ((1, False), (8, True), (48, True), (100, False)):
        codes = gptq_codes(w, h, scale, 4, block, 0.01, act_order)
        assert codes.dtype == torch.int8 and codes.abs().max() <= 7 and not codes[:, 7].any()
        assert output_error(w, dequantize_rows(codes, scale), h) < rtn


def test_self_generated_calibration_is_seeded(trained):
    model, _ = trained
    a = generate(model, 3, 12, 0.8, seed=4, batch=2)
    assert a.shape == (3, 12) and a.dtype == torch.int64 and int(a.max()) < model.vocab_size
    assert torch.equal(a, generate(model, 3, 12, 0.8, seed=4, batch=2))
    assert not torch.equal(a, generate(model, 3, 12, 0.8, seed=5, batch=2))


def test_validation_data_is_refused_for_calibration(trained):
    for source in ("val", "validation"):
        with pytest.raises(ConfigError, match=r"calibrate\.source: .* leaks them into the artifact"):
            validate({"calibrate": {"source": source}})
    with pytest.raises(ConfigError, match=r"calibrate\.source: unknown source 'shards'"):
        validate({"calibrate": {"source": "shards"}})
    with pytest.raises(ValueError, match="validation data would leak"):
        calibration_tokens(trained[0], None, {**CFG["calibrate"], "source": "val"}, 0)


def test_calibration_seconds_leave_out_pgolfs_shard_hashing(trained, tiny_dataset, tmp_path, monkeypatch):
    """The seconds the Hessians record count as training in pgolf check: GPTQ's own work, not the
    sha256 of every train shard, done before the clock (and not again when windows are drawn)."""
    from pgolf.formats import shards as shardfmt
    from pgolf.quant import calibrate as cal

    real, opened = shardfmt.open_shard, []

    def slow(path, *args, **kw):
        if path not in opened:  # a FineWeb shard's hash, stood in for by the clock: once a shard
            time.sleep(0.4)
        opened.append(path)
        return real(path, *args, **kw)

    monkeypatch.setattr(cal, "open_shard", slow)
    _, path = trained
    n = len(shardfmt.shard_files(tiny_dataset.dataset_dir, "train"))
    calibrate(path, tiny_dataset.dataset_dir, CFG["calibrate"], 3, tmp_path / "h.pgt", torch.device("cpu"))
    seconds = tensorfile.read_meta(tmp_path / "h.pgt")["seconds"]
    assert len(opened) == 2 * n and seconds < 0.4 * n, (seconds, n)
