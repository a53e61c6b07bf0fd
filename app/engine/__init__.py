"""The engine: runtime (step, scheduler, sequences, the async bridge), network (model, attention
backends, KV pool, runner) and loading (Hugging Face folders, built-in models).

What only CUDA runs, and where its logic is tested on the CPU (keep this list whole: it is what
a GPU session, `make gpu-check`, has to prove):

- The Triton kernels (kernels/store_kv.py, kernels/paged_attention.py), the CUDA attention
  backend (network/attention/triton_backend.py). On the CPU under Triton's interpreter, float32
  (the interpreter computes bfloat16 wrongly): the whole engine through them against the CPU path
  and transformers (tests/kernels/test_engine_triton_path.py; `attention_backend="triton"`), one
  case per kernel and dtype incl. float16 and a forced split (bench/gpu_check.py
  --interpret-smoke, tests/kernels/test_gpu_check_script.py). Their references
  (kernels/*_ref.py) serve the CPU (tests/engine/test_engine_attention.py).
- The kernels' launch choices from the device: split-KV by SM count, the bf16/fp16 tile sizes
  (tests/kernels/test_launch_choices.py, with the SM count given; only CUDA compiles them).
- Pinned host memory and non-blocking host -> device copies of the step's tensors
  (network/runner.py `_tensor`): the values are the CPU path's (tests/engine/test_engine_runner.py).
- The sampler and each sequence's generator on the device (runtime/sampler.py, sequence.py), with
  the step's one device -> host copy (`chosen.tolist()` in runtime/llm_engine.py): the same code on
  the CPU (tests/engine/test_engine_sampler.py); a device generator draws other numbers than a
  CPU one, so seeded replies differ across devices (not a contract).
- Weights read by safetensors straight into GPU memory (loading/loader.py): the CPU reads the same
  tensors (tests/unit/test_model_loader.py).
- Plain linears (F.linear on cuBLAS; torch keeps TF32 off for float32 matmuls by default): the
  CPU prepacks instead (network/packed_linear.py); the plain path is the "plain" half of
  tests/reference/test_hf_parity.py.
- Benchmarks' CUDA events and synchronizes (bench/gpu_check.py, bench/gpu_multiturn.py): their
  logic runs in their CPU modes (tests/unit/test_bench_gpu_multiturn.py,
  tests/unit/test_bench_gpu_suite.py, tests/kernels/test_gpu_suite_script.py).
- CUDA graphs of decode steps and of short mixed steps (network/compiled_step.py, on by default
  on CUDA): replays equal eager steps on an H200 (tests/engine/test_engine_cuda_graphs.py, run
  there with `--noconftest`); on the CPU the same static buffers and padding run with a stand-in
  for the graph (tests/kernels/test_engine_captured_decode.py).
- The host tier's pinned buffers and copy stream (network/kv_offload.py): the tier tests run on a
  GPU with KVTHREADS_TEST_DEVICE=cuda (tests/engine/test_engine_tiers.py).

And the other way round, CPU only: prepacked linears, the thread mirror and its attention
(network/attention/thread_mirror.py, row_attention.py), the allocator's thresholds
(network/host_memory.py).
"""
