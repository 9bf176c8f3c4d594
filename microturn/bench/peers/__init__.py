"""`microturn bench peers`: one workload on microturn and the engines people would otherwise
use (transformers, llama.cpp, re-prefill), one after another in the same run."""
