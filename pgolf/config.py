"""Config loading and validation against schemas/config.schema.yaml (defaults live there only)."""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from pgolf.errors import ConfigError
from pgolf.train.schedule import grad_accum_steps

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "config.schema.yaml"


def load_schema() -> dict:
    """The schema, parsed once per version of the file (a study validates a config per variant, and
    parsing the YAML took half of a Snakefile's 0.7 s parse); a copy, so no caller can change it."""
    st = SCHEMA_PATH.stat()
    return copy.deepcopy(_parsed_schema(st.st_mtime_ns, st.st_size))


@functools.lru_cache(maxsize=2)
def _parsed_schema(mtime_ns: int, size: int) -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _fill_defaults(schema: dict, node: dict) -> None:
    for key, sub in schema.get("properties", {}).items():
        if key not in node and "default" in sub:
            node[key] = copy.deepcopy(sub["default"])
        if isinstance(node.get(key), dict) and sub.get("type") == "object":
            _fill_defaults(sub, node[key])


def _where(error: jsonschema.ValidationError) -> str:
    """The key as a person writes it: `eval.max_tokens`, `seeds[0]`."""
    out = ""
    for part in error.absolute_path:
        out += f"[{part}]" if isinstance(part, int) else f"{'.' if out else ''}{part}"
    return out or "<top level>"


def _is_integer(checker: Any, instance: Any) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)


# JSON Schema's "integer" takes 1.0 (any float with no fraction); an integer key would then hold a
# float downstream: `seeds: [1e0]` planned the folder seed1.0/, `eval.max_tokens: 2e3` sliced a tensor
# with 2000.0. Here an integer is a Python int, whatever YAML or --config wrote.
_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer))

# What YAML 1.1 read as booleans, and YAML 1.2 (this reader) reads as strings.
_YAML_1_1_BOOLS = {"y", "yes", "n", "no", "on", "off"}


def _explain(error: jsonschema.ValidationError) -> str:
    """The schema's message, where it says too little with what to write instead: a bare regular
    expression gets the key's description, a float under an integer key and a YAML 1.1 boolean get
    the form the key takes."""
    value, types = error.instance, error.validator_value
    if error.validator == "type" and isinstance(value, float) and "integer" in types and "number" not in types:
        like = int(value) if value.is_integer() else round(value)
        return f"{value!r} is a float; an integer key takes a whole number like {like}"
    if error.validator == "type" and "boolean" in types and str(value).lower() in _YAML_1_1_BOOLS:
        return f"{value!r} is a string, not a boolean: write true or false (YAML 1.2 reads yes/no/on/off as text)"
    hint = error.schema.get("description") if error.validator == "pattern" else None
    return f"{error.message} ({hint})" if hint else error.message


def validate(config: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of `config` with defaults filled in; raise ConfigError naming the bad key."""
    schema = load_schema()
    config = copy.deepcopy(config or {})
    cal = config.get("calibrate")
    written = dict(cal) if isinstance(cal, dict) else {}  # before the defaults fill it in
    _fill_defaults(schema, config)
    errors = sorted(_Validator(schema).iter_errors(config), key=lambda e: e.path)
    if errors:
        lines = [f"  {_where(e)}: {_explain(e)}" for e in errors]
        raise ConfigError("invalid pgolf config:\n" + "\n".join(lines))
    _check_consistency(config)
    _resolve_calibration(config["calibrate"], config["train"], written)
    return config


def _check_consistency(cfg: dict[str, Any]) -> None:
    m, t = cfg["model"], cfg["train"]
    if m["model_dim"] % m["num_heads"]:
        raise ConfigError(f"model.model_dim ({m['model_dim']}) must be divisible by num_heads ({m['num_heads']})")
    if (m["model_dim"] // m["num_heads"]) % 2:
        raise ConfigError("model.model_dim / model.num_heads must be even (rotary embeddings rotate pairs)")
    if m["num_heads"] % m["num_kv_heads"]:
        raise ConfigError(f"model.num_heads ({m['num_heads']}) is not a multiple of num_kv_heads ({m['num_kv_heads']})")
    _check_model_switches(m, t)
    if t["batch_tokens"] % t["seq_len"]:
        raise ConfigError(f"train.batch_tokens ({t['batch_tokens']}) must be a multiple of seq_len ({t['seq_len']})")
    grad_accum_steps(t, t["nproc"])
    c = cfg["compare"]
    if c["baseline_run"] == cfg["run"]:
        raise ConfigError(f"compare.baseline_run: {c['baseline_run']!r} is this run itself; name another run")
    if c["baseline_run"] and c["baseline_mean"] is not None:
        raise ConfigError("compare: give either baseline_run or baseline_mean/baseline_std, not both")
    if (c["baseline_mean"] is None) != (c["baseline_std"] is None):
        raise ConfigError("compare: baseline_mean and baseline_std go together")
    hub = cfg["data"]["hub"]
    if cfg["data"]["source"] == "fineweb":
        from pgolf.data.fetch_fineweb import is_caseops, vocab_of

        if vocab_of(hub["variant"]) != cfg["tokenizer"]["vocab_size"]:
            raise ConfigError(f"tokenizer.vocab_size ({cfg['tokenizer']['vocab_size']}) must match data.hub.variant "
                              f"({hub['variant']}) for source fineweb")
        if is_caseops(hub["variant"]) != cfg["tokenizer"]["caseops"]:
            raise ConfigError(f"tokenizer.caseops ({cfg['tokenizer']['caseops']}) must say whether data.hub.variant "
                              f"({hub['variant']}) is a CaseOps export (its name has 'caseops') for source fineweb")
    if cfg["data"]["source"] == "local" and not cfg["data"]["paths"]:
        raise ConfigError("data.paths: source 'local' needs at least one folder or glob")
    check_calibration(cfg["calibrate"])
    if cfg["loader"]["mode"] == "ordered" and cfg["loader"]["order"] == "given" and not cfg["loader"]["shard_order"]:
        raise ConfigError("loader.shard_order: order 'given' needs the shard indices in the order to read them")
    check_ttt_legality(cfg["eval"]["ttt"])
    if cfg["eval"]["ttt"]["train_softcap"] and not cfg["model"]["asym_softcap"]:
        raise ConfigError("eval.ttt.train_softcap trains model.asym_softcap's caps: it needs model.asym_softcap: true")
    check_phased_ttt(cfg["eval"]["ttt"], cfg["eval"]["seq_len"])
    if c["metric"] in ("ttt_bpb", "ttt_ngram_bpb") and not cfg["eval"]["ttt"]["enabled"]:
        raise ConfigError(f"compare.metric: {c['metric']} needs eval.ttt.enabled: true")
    if "_ngram_" in c["metric"] and not cfg["eval"]["ngram_tilt"]["enabled"]:
        raise ConfigError(f"compare.metric: {c['metric']} needs eval.ngram_tilt.enabled: true")
    _resolve_codec_level(cfg["compress"])


SCORE_FIRST = ("the score-before-update rule (parameter-golf issues #402 and #677): every val token must be "
               "scored before the model adapts on it, and its first score is the one reported")


def check_ttt_legality(ttt: dict[str, Any]) -> None:
    """Refuse every TTT setting that would adapt on val tokens before they are scored."""
    if ttt["prequant"]:
        raise ConfigError(f"eval.ttt.prequant: fine-tuning on val before quantization breaks {SCORE_FIRST}")
    if ttt["passes"] > 1:
        raise ConfigError(f"eval.ttt.passes={ttt['passes']}: a later pass would report tokens the model "
                          f"already trained on, which breaks {SCORE_FIRST}")
    if ttt["rescore"]:
        raise ConfigError(f"eval.ttt.rescore: scoring a chunk again after training on it breaks {SCORE_FIRST}")


def check_phased_ttt(ttt: dict[str, Any], seq_len: int) -> None:
    """Phased TTT scores each chunk of a document in one window, and trains each phase on documents."""
    if ttt["mode"] != "phased_lora":
        return
    if ttt["lora_chunk_tokens"] > seq_len:
        raise ConfigError(f"eval.ttt.lora_chunk_tokens={ttt['lora_chunk_tokens']} is longer than "
                          f"eval.seq_len={seq_len}: a chunk must fit in one scoring window")
    if ttt["phases"] > ttt["phase_docs"]:
        raise ConfigError(f"eval.ttt.phases={ttt['phases']} is more than eval.ttt.phase_docs={ttt['phase_docs']}: "
                          "every phase needs at least one scored document to train on")


# What calibration may read. Val tokens are scored later; Hessians built from them would carry
# them into the artifact (the challenge forbids val access before scoring, issue #677).
CALIBRATION_SOURCES = ("train", "generate")


def check_calibration(cal: dict[str, Any]) -> None:
    source = cal["source"]
    if source.lower() in ("val", "valid", "validation", "test"):
        raise ConfigError(f"calibrate.source: {source!r} is refused: calibrating on validation tokens leaks them "
                          "into the artifact's Hessians, and the challenge scores on exactly those tokens; "
                          "use 'train' or 'generate'")
    if source not in CALIBRATION_SOURCES:
        raise ConfigError(f"calibrate.source: unknown source {source!r}; known: {', '.join(CALIBRATION_SOURCES)}")


def _resolve_calibration(cal: dict[str, Any], train: dict[str, Any], written: dict[str, Any]) -> None:
    """calibrate.batches counts as the records do (GPTQ_CALIBRATION_BATCHES): batches of one training
    process's micro-batch. It sets seqs and seq_len; values written beside it must agree, so that a
    layer over a preset that sets batches cannot change the volume by a seqs that would be ignored."""
    if not cal["batches"]:
        return
    per_process = train["batch_tokens"] // train["seq_len"] // train["nproc"]
    micro = min(train["micro_batch_seqs"], per_process)
    derived = {"seqs": cal["batches"] * micro, "seq_len": train["seq_len"]}
    for key, value in derived.items():
        if key in written and written[key] != value:
            raise ConfigError(f"calibrate.{key}: {written[key]} disagrees with calibrate.batches={cal['batches']} "
                              f"(batches of {micro} sequences of train.seq_len={train['seq_len']} tokens: "
                              f"{key} {value}); drop {key}, or set batches: 0 to count sequences")
        cal[key] = value


# codec -> (lowest, highest) level; null in the config means the highest.
CODEC_LEVELS = {"zstd": (1, 22), "brotli": (0, 11), "lzma": (0, 9), "zpaq": (1, 5)}


def _resolve_codec_level(comp: dict[str, Any]) -> None:
    if comp["zpaq"] and comp["codec"] != "pergroup":
        raise ConfigError(f"compress.zpaq: ZPAQ as a candidate for each stream needs codec pergroup (codec is "
                          f"{comp['codec']!r}); for the whole payload set codec: zpaq")
    if comp["codec"] == "pergroup":  # each stream's codec is chosen, at its strongest level
        if comp["level"] is not None or comp["pack"]:
            raise ConfigError("compress: codec pergroup takes no level (each stream uses its codec's strongest) "
                              "and no pack (its buckets hold one int8 per code); leave level null, pack false")
        return
    lo, hi = CODEC_LEVELS[comp["codec"]]
    if comp["level"] is None:
        comp["level"] = hi
    elif not lo <= comp["level"] <= hi:
        raise ConfigError(f"compress.level: {comp['level']} is outside {lo}..{hi} for codec {comp['codec']}")


def _check_model_switches(m: dict[str, Any], t: dict[str, Any]) -> None:
    n, head_dim = m["num_layers"], m["model_dim"] // m["num_heads"]
    rd = m["rope_dims"] or head_dim
    if rd > head_dim or rd % 2 or (rd <= 2 and m["rope_ntk_train_len"]):
        raise ConfigError(f"model.rope_dims ({m['rope_dims']}) must be even, at most the head dim ({head_dim}), "
                          "and above 2 with NTK scaling")
    logical = m["logical_layers"]
    if logical and (logical <= n or m["recur_layers"]):
        raise ConfigError(f"model.logical_layers ({logical}) must exceed num_layers={n} and excludes recur_layers")
    for key, limit in (("ve_layers", logical or n), ("recur_layers", n)):
        if any(i >= limit for i in m[key]):
            raise ConfigError(f"model.{key}: {m[key]} names a layer beyond {limit}")
    span = sorted(m["recur_layers"])
    if span and span != list(range(span[0], span[-1] + 1)):
        raise ConfigError(f"model.recur_layers: {m['recur_layers']} is not a contiguous span of blocks")
    if m["parallel_from"] >= n:
        raise ConfigError(f"model.parallel_from ({m['parallel_from']}) must be below num_layers={n} (-1 = off)")
    if m["doc_attention"] and m["attention"] == "fa3":
        raise ConfigError("model.doc_attention runs FlexAttention or masked SDPA, not FlashAttention 3's "
                          "varlen kernel: it excludes attention 'fa3' (use auto or sdpa)")
    if m["recur_start_step"] and m["recur_start_frac"]:
        raise ConfigError("model: give recur_start_step or recur_start_frac, not both")
    if t["qat_below"] and not m["qat_bits"]:
        raise ConfigError("train.qat_below switches late QAT on, but model.qat_bits is 0 (no fake quantization)")
    if m["asym_softcap"] and not m["logit_softcap"]:
        raise ConfigError("model.asym_softcap caps the logits: it needs model.logit_softcap above 0")
    if t["warmdown_frac"] >= 1:
        raise ConfigError("train.warmdown_frac must be below 1 (the fraction of training spent in warmdown)")


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


class _StrictLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys without a word; a config must not lose a section that way."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


# PyYAML follows YAML 1.1: `3e-4` is a string there (a float needs a dot), `010` is octal 8, `1:30` is
# 90 (base 60), `1_000` is 1000, yes/no/on/off are booleans and `2024-05-01` is a date. This reader,
# used for config.yaml, presets, their `extends`, --config values and (through rules/common.smk)
# Snakemake's own --configfile, resolves plain scalars as YAML 1.2's core schema does: 3e-4 a float,
# 010 ten, and 1:30, 1_000, yes and 2024-05-01 text, which a number or boolean key then refuses by name.
_YAML_1_1_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("bool", "int", "float", "timestamp", "value")}
_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _YAML_1_1_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_INT_1_2 = re.compile(r"^(?:([-+]?[0-9]+)|0o([0-7]+)|0x([0-9a-fA-F]+))$")
_CORE_1_2 = (  # in this order: an int also matches the float pattern
    ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("int", _INT_1_2.pattern, "-+0123456789"),
    ("float", r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
              r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$", "-+.0123456789"),
)
for _tag, _pattern, _first in _CORE_1_2:
    _StrictLoader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(_pattern), list(_first))


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    """A YAML 1.2 integer: decimal whatever its leading zeros, 0o octal, 0x hex (not 1.1's 010 = 8)."""
    m = _INT_1_2.match(loader.construct_scalar(node))
    if m is None:
        raise yaml.constructor.ConstructorError(None, None, f"{node.value!r} is not a YAML 1.2 integer",
                                                node.start_mark)
    decimal, octal, hexa = m.groups()
    return int(decimal, 10) if decimal else int(octal, 8) if octal else int(hexa, 16)


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


class _StrictDumper(yaml.SafeDumper):
    """Quotes every string that YAML 1.2 (this reader) or YAML 1.1 (Snakemake's own) would read as
    another type, a run named 1e3 or yes: `pgolf config`'s output reads back as the same config."""


_StrictDumper.yaml_implicit_resolvers = {
    first: yaml.SafeDumper.yaml_implicit_resolvers.get(first, []) + _StrictLoader.yaml_implicit_resolvers.get(first, [])
    for first in {*yaml.SafeDumper.yaml_implicit_resolvers, *_StrictLoader.yaml_implicit_resolvers}}


def dump(config: dict[str, Any]) -> str:
    """A config as YAML that read_file reads back to the same values."""
    return yaml.dump(config, Dumper=_StrictDumper, sort_keys=False)


def read_file(path: str | Path) -> dict:
    """One config file as a mapping; a missing file, bad YAML or a repeated key fails naming the file."""
    p = Path(path)
    try:
        data = yaml.load(p.read_text(), Loader=_StrictLoader) or {}
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping")
    return data


def typed_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """Snakemake's --config values with their types back: it types a top-level value itself, but
    reads a list or mapping with YAML's BaseLoader, so `seeds=[1337]` arrives as ['1337']. Each
    string inside one is read again as a YAML 1.2 scalar (1337, 3e-4, true), as a config file's is."""
    return {k: _retyped(v) if isinstance(v, (dict, list)) else v for k, v in overrides.items()}


def _retyped(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _retyped(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_retyped(v) for v in value]
    if isinstance(value, str) and value.strip():
        try:
            return yaml.load(value, Loader=_StrictLoader)
        except yaml.YAMLError:
            return value
    return value


def read_layers(path: str | Path, seen: tuple[Path, ...] = ()) -> dict:
    """A config file merged over the file its top-level `extends` names (relative to it), recursively:
    a preset either stands on the schema's defaults alone or says what it builds on."""
    data = read_file(path)
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: extends must be the path of another config file, got {base!r}")
    here, target = Path(path).resolve(), (Path(path).parent / base).resolve()
    if target in (*seen, here):
        raise ConfigError(f"{path}: extends {base} leads back to itself")
    return deep_merge(read_layers(target, (*seen, here)), data)


def merged(*paths: str | Path, overrides: dict | None = None) -> dict[str, Any]:
    """YAML files merged left to right (as Snakemake's --configfile does), each over what it extends,
    then the overrides; not yet validated (a study's variants merge over it: pgolf.pipeline.study)."""
    out: dict = {}
    for p in paths:
        out = deep_merge(out, read_layers(p))
    return deep_merge(out, overrides or {})


def load(*paths: str | Path, overrides: dict | None = None) -> dict[str, Any]:
    """Merge YAML files left to right (as Snakemake's --configfile does), each over what it extends,
    then validate."""
    return validate(merged(*paths, overrides=overrides))
