"""Attention launch configurations timed on real GPUs, written by ``python bench/tune_attention.py`` (do not edit by
hand): TABLE[arch]["<dtype> d<head_dim> bh<B*H> q<N_q> kv<N_kv>"] (counts rounded up to powers of two) =
{"tile": [block_m, block_n, block_dv, num_warps, num_stages], "kv_splits": n, "us": median time, "gpu": name,
"date": when}. Buckets missing here run the heuristic of kernels/support/attention_config.py.

No entry has been timed yet: no fastdec kernel has run on a GPU (issue 21). bench/gpu_run.sh --tune writes the
table of the GPU it runs on into its output folder, ready to be copied here.
"""

TABLE: dict[str, dict[str, dict]] = {}
