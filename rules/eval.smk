# Val BPB of the EMA weights, of the weights read back from the artifact, and by sliding window.
# With pruning on it also reads the quantized tensors before pruning, to score what pruning cost.


rule evaluate:
    input:
        unpack(keyed_inputs("evaluate")),
    output:
        **keyed_outputs("evaluate"),
    params:
        **keyed_params("evaluate"),
    threads: threads_of("evaluate")
    resources:
        nproc=nproc("evaluate"),
        gpu=gpus("evaluate"),
        **slurm("evaluate"),
    group: group_of("evaluate")
    log:
        keyed_file("evaluate", "evaluate.log"),
    benchmark:
        keyed_file("evaluate", "benchmark.tsv")
    shell:
        # params.unpruned: a flag and its path, or nothing: a list, so that :q quotes each element
        TORCHRUN + " evaluate --data {input.data:q} --tokenizer {input.tokenizer:q} --ema {input.ema:q} "
        "--artifact {input.artifact:q} --cfg {params.cfg:q} --device {params.device:q} --precision {params.precision:q} "
        "{params.unpruned:q} --out {output.eval:q} > {log:q} 2>&1"
