"""Which code each switch of the config needs: the packed train_gpt.py of a run holds only its own.

Each Feature names a test on the resolved config and the code that only that switch runs: a
module, a top-level definition ('module:name'), a method no base class defines ('module:Class.method')
or an entry of a top-level dict ('module:NAME[key]', a registry such as the quantization methods or
the codecs). When the test is false the packer
(pgolf.pipeline.bundle) leaves that code out, and with it whatever only that code used
(pgolf.pipeline.reach). The call sites stay, behind the switch the test reads: the packed file of a
run never reaches them, and a file run with another config fails there loudly (an undefined name,
or "pgolf.x is not packed"), never silently. The packer refuses a file in which code that runs on
import names what went, and the tests run each preset's packed file on its own.

Kept free of torch: parsing the Snakefile computes each run's features.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

CODECS = ("zstd", "brotli", "lzma", "zpaq")


@dataclass(frozen=True)
class Feature:
    name: str
    needed: Callable[[dict], bool]  # from the whole resolved config
    code: tuple[str, ...]  # what only it runs: 'module', 'module:name', 'module:Class.method', 'module:NAME[key]'


def _clips(cfg: dict) -> set[str]:
    clip = cfg["quant"]["clip"]
    return {clip} if isinstance(clip, str) else set(clip.values())


def _parallel(cfg: dict, mode: str) -> bool:
    return cfg["model"]["parallel_from"] >= 0 and cfg["model"]["parallel_mode"] == mode


def _ttt(cfg: dict, mode: str) -> bool:
    ttt = cfg["eval"]["ttt"]
    return ttt["enabled"] and ttt["mode"] == mode


def _codec(name: str) -> Feature:
    # pergroup gives each stream whichever of the fast codecs compresses it best, and ZPAQ with compress.zpaq
    def needed(c: dict) -> bool:
        comp = c["compress"]
        return comp["codec"] == name or comp["codec"] == "pergroup" and (name != "zpaq" or comp["zpaq"])
    return Feature(f"codec_{name}", needed, (f"pgolf.quant.codec:CODECS[{name}]",))


FEATURES: tuple[Feature, ...] = (
    # model (pgolf/model)
    Feature("bigram", lambda c: c["model"]["bigram_buckets"] > 0, ("pgolf.model.layers:BigramHash",)),
    Feature("smear", lambda c: c["model"]["smear_gate"], ("pgolf.model.gpt:GPT.smear_gate",)),
    Feature("smear_lerp", lambda c: c["model"]["smear_gate"] and c["model"]["smear_mode"] != "input",
            ("pgolf.model.layers:SmearGate",)),
    Feature("smear_input", lambda c: c["model"]["smear_gate"] and c["model"]["smear_mode"] == "input",
            ("pgolf.model.layers:InputSmearGate",)),
    Feature("value_embeddings", lambda c: bool(c["model"]["ve_layers"]), ("pgolf.model.layers:ValueEmbedding",)),
    Feature("xsa", lambda c: c["model"]["xsa_last_n"] > 0, ("pgolf.model.layers:exclusive",)),
    Feature("doc_attention", lambda c: c["model"]["doc_attention"], ("pgolf.model.layers:doc_mask",)),
    Feature("qat", lambda c: c["model"]["qat_bits"] > 0, ("pgolf.model.layers:fake_quant",)),
    Feature("late_qat", lambda c: c["train"]["qat_below"] > 0, ("pgolf.model.gpt:GPT.set_qat",)),
    Feature("own_norms", lambda c: c["model"]["recur_own_norms"], ("pgolf.model.gpt:Controls",)),
    Feature("lanes", lambda c: _parallel(c, "lanes"), ("pgolf.model.gpt:Block.lanes",)),
    Feature("mixed_lanes", lambda c: _parallel(c, "mixed_lanes"), ("pgolf.model.gpt:Block.mixed_lanes",)),
    Feature("orthogonal_init", lambda c: c["model"]["init"] == "orthogonal", ("pgolf.model.gpt:GPT.orthogonal_init",)),
    # training (pgolf/train, pgolf/optim)
    Feature("swa", lambda c: c["train"]["swa"], ("pgolf.train.averaging:SWA",)),
    Feature("loader_ordered", lambda c: c["loader"]["mode"] == "ordered", ("pgolf.train.train:read_shard_order",)),
    Feature("loader_shuffled", lambda c: c["loader"]["mode"] == "shuffled", ("pgolf.train.loader:ShuffledWindows",)),
    Feature("ns_classic", lambda c: c["train"]["muon_ns"] == "classic", ("pgolf.optim.muon:COEFFS[classic]",)),
    Feature("ns_polar_express", lambda c: c["train"]["muon_ns"] == "polar_express",
            ("pgolf.optim.muon:COEFFS[polar_express]",)),
    # calibration and quantization (pgolf/quant): GPTQ is the calibrate stage's only reader
    Feature("gptq", lambda c: c["quant"]["method"] == "gptq",
            ("pgolf.quant.calibrate", "pgolf.quant.gptq", "pgolf.quant.quantize:METHODS[gptq]")),
    Feature("calibrate_generate", lambda c: c["calibrate"]["source"] == "generate",
            ("pgolf.quant.calibrate:generate",)),
    Feature("rtn", lambda c: c["quant"]["method"] == "rtn", ("pgolf.quant.quantize:METHODS[rtn]",)),
    Feature("sdclip", lambda c: "sdclip" in _clips(c), ("pgolf.quant.clip:sdclip_scale",)),
    Feature("clip_search_matrix", lambda c: "search" in _clips(c) and c["quant"]["clip_scope"] == "matrix",
            ("pgolf.quant.clip:matrix_search_scale",)),
    Feature("clip_search_row", lambda c: "search" in _clips(c) and c["quant"]["clip_scope"] != "matrix",
            ("pgolf.quant.clip:search_scale",)),
    Feature("magnitude_prune", lambda c: c["quant"]["magnitude_prune"] > 0, ("pgolf.quant.rtn:magnitude_prune",)),
    Feature("int8_rows", lambda c: bool(c["quant"]["int8_rows"]), ("pgolf.quant.quantize:int8_row_codes",)),
    Feature("lqer", lambda c: c["quant"]["lqer"]["rank"] > 0, ("pgolf.quant.lqer",)),
    # compression (pgolf/quant)
    *(_codec(name) for name in CODECS),
    Feature("pergroup", lambda c: c["compress"]["codec"] == "pergroup",
            ("pgolf.quant.pergroup", "pgolf.quant.artifact:_pergroup_raw")),
    Feature("one_stream", lambda c: c["compress"]["codec"] != "pergroup",  # every codec but pergroup's streams
            ("pgolf.quant.artifact:pack_payload", "pgolf.quant.artifact:_decompress",
             "pgolf.quant.artifact:_unpack_payload")),
    Feature("pack", lambda c: c["compress"]["pack"], ("pgolf.quant.pack:pack_codes", "pgolf.quant.pack:unpack_codes")),
    Feature("prune", lambda c: c["compress"]["prune"], ("pgolf.quant.compress:prune_to_fit",)),
    # evaluation (pgolf/eval)
    Feature("ttt", lambda c: c["eval"]["ttt"]["enabled"], ("pgolf.eval.tttsteps",)),
    Feature("ttt_chunk", lambda c: _ttt(c, "chunk"), ("pgolf.eval.ttt",)),
    Feature("ttt_phased_lora", lambda c: _ttt(c, "phased_lora"), ("pgolf.eval.phased", "pgolf.eval.lora")),
    # the n-gram tilt of the scored passes: its hints and tilted meter (windows asks a meter whether it tilts)
    Feature("ngram_tilt", lambda c: c["eval"]["ngram_tilt"]["enabled"], ("pgolf.eval.ngram",)),
    # BPB from the dataset's byte sidecar (CaseOps), or from the tokenizer's byte tables (every other run)
    Feature("caseops", lambda c: c["tokenizer"]["caseops"],
            ("pgolf.eval.bpb:ByteSidecar", "pgolf.formats.shards:load_sidecar",
             "pgolf.formats.shards:_sidecar_problem")),
    Feature("byte_tables", lambda c: not c["tokenizer"]["caseops"],
            ("pgolf.eval.bpb:ByteLUTs", "pgolf.eval.bpb:build_byte_luts", "pgolf.eval.bpb:target_bytes")),
)
BY_NAME = {f.name: f for f in FEATURES}


def needed(cfg: dict) -> frozenset[str]:
    """The names of the features the resolved config switches on."""
    return frozenset(f.name for f in FEATURES if f.needed(cfg))


def left_out(on: frozenset[str]) -> list[str]:
    """The code of every feature not in `on`, in table order."""
    unknown = sorted(on - BY_NAME.keys())
    if unknown:
        raise RuntimeError(f"unknown features {unknown}; known: {', '.join(BY_NAME)}")
    return [entry for f in FEATURES if f.name not in on for entry in f.code]
