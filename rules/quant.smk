# EMA weights -> Hessians (calibrate) -> quantized tensors -> compressed artifact; size.json counts
# code plus model bytes. Hessians are their own file, so a change of clip or bits reruns quantize only.
# One thread each (Snakemake's default): GPTQ is a loop of small column updates that more OpenMP
# threads only slow down on a busy CPU, and seeds then quantize side by side. Which inputs each job
# has (Hessians only for GPTQ, and for compress only with pruning on) is pgolf/pipeline/plan.py's.


rule calibrate:
    input:
        unpack(keyed_inputs("calibrate")),
    output:
        **keyed_outputs("calibrate"),
    params:
        **keyed_params("calibrate"),
    resources:
        gpu=gpus("calibrate"),
        **slurm("calibrate"),
    group: group_of("calibrate")
    log:
        keyed_file("calibrate", "calibrate.log"),
    benchmark:
        keyed_file("calibrate", "benchmark.tsv")
    shell:
        # params.data: a flag and its path, or nothing: a list, so that :q quotes each element
        "pgolf calibrate --weights {input.ema:q} {params.data:q} --cfg {params.cfg:q} --seed {params.seed:q} "
        "--device {params.device:q} --precision {params.precision:q} --out {output.hessians:q} > {log:q} 2>&1"


rule quantize:
    input:
        unpack(keyed_inputs("quantize")),
    output:
        **keyed_outputs("quantize"),
    params:
        **keyed_params("quantize"),
    resources:
        **slurm("quantize"),
    group: group_of("quantize")
    log:
        keyed_file("quantize", "quantize.log"),
    benchmark:
        keyed_file("quantize", "benchmark.tsv")
    shell:
        "pgolf quantize --weights {input.ema:q} {params.hessians:q} --cfg {params.cfg:q} --out {output.quant:q} "
        "> {log:q} 2>&1"


rule compress:
    input:
        unpack(keyed_inputs("compress")),
    output:
        **keyed_outputs("compress"),
    params:
        **keyed_params("compress"),
    resources:
        **slurm("compress"),
    group: group_of("compress")
    log:
        keyed_file("compress", "compress.log"),
    benchmark:
        keyed_file("compress", "benchmark.tsv")
    shell:
        "pgolf compress --quant {input.quant:q} --cfg {params.cfg:q} {params.hessians:q} --out {output.artifact:q} "
        "> {log:q} 2>&1"


# Its own rule so that editing code reruns only this check, not compression and evaluation.
rule size:
    localrule: is_local("size")
    input:
        unpack(keyed_inputs("size")),
    output:
        **keyed_outputs("size"),
    params:
        **keyed_params("size"),
    log:
        keyed_file("size", "size.log"),
    shell:
        "pgolf size --artifact {input.artifact:q} --cfg {params.cfg:q} --features {params.features:q} "
        "--out {output.size:q} > {log:q} 2>&1"
