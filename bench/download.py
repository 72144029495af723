"""Download throughput of the HTTP layer against a loopback server that adds latency per request.

    python bench/download.py [--items 480] [--latency 0.05] [--concurrency 16] [--json OUT.json]

Three numbers, items per second, for the same files from the same server:
- `sequential`: a plain `requests.get` loop (one request in flight);
- `audiodata`: `HttpClient.get_bytes` at its default settings (`HttpConfig()`), driven the way a
  build drives a web source: `audio_dataset.build.ordered_prefetch` with `fetch_concurrency`
  downloads in flight (16 for the web sources);
- `ceiling`: in-flight / latency, what an ideal client could reach.
The server runs in its own process so its request handling does not share the client's GIL; each
item is a real clip from tests/data (15 kB). Target: audiodata >= 0.8 x ceiling.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from checks import require  # noqa: E402
CLIP = ROOT / "tests" / "data" / "real-audio" / "456440__inspectorj__bird-whistling-robin-single-13.ogg"


def _serve(latency: float, items: int, port_out: "multiprocessing.Queue", stop: "multiprocessing.Event") -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from loopback import LoopbackServer

    body = CLIP.read_bytes()
    with LoopbackServer(latency=latency) as server:
        for index in range(items):
            server.add(f"/media/{index}.ogg", body, "audio/ogg")
        port_out.put(server.port)
        stop.wait()


def _sequential(urls: list[str]) -> float:
    import requests

    body = CLIP.read_bytes()
    fetched = 0
    started = time.perf_counter()
    with requests.Session() as session:
        for url in urls:
            response = session.get(url, timeout=30)
            response.raise_for_status()
            fetched += response.content == body
    elapsed = time.perf_counter() - started
    require(fetched == len(urls), f"sequential: {fetched} of {len(urls)} responses were the clip served")
    return len(urls) / elapsed


def _audiodata(urls: list[str], concurrency: int) -> float:
    from audio_dataset.build import ordered_prefetch
    from audio_dataset.http import HttpClient, HttpConfig

    body = CLIP.read_bytes()
    client = HttpClient(HttpConfig())
    fetched = 0
    started = time.perf_counter()
    for _, future in ordered_prefetch(client.get_bytes, urls, concurrency):
        fetched += future.result() == body
    elapsed = time.perf_counter() - started
    require(fetched == len(urls), f"audiodata: {fetched} of {len(urls)} downloads were the clip served")
    return len(urls) / elapsed


def run(items: int, latency: float, concurrency: int, sequential_items: int) -> dict[str, float]:
    context = multiprocessing.get_context("spawn")
    port_out, stop = context.Queue(), context.Event()
    server = context.Process(target=_serve, args=(latency, items, port_out, stop), daemon=True)
    server.start()
    try:
        port = port_out.get(timeout=30)
        urls = [f"http://127.0.0.1:{port}/media/{i}.ogg" for i in range(items)]
        _audiodata(urls[: 2 * concurrency], concurrency)  # warm up: imports, connections
        sequential = _sequential(urls[:sequential_items])
        ours = _audiodata(urls, concurrency)
    finally:
        stop.set()
        server.join(timeout=10)
    ceiling = concurrency / latency
    return {"items": items, "latency_s": latency, "concurrency": concurrency,
            "sequential_items_per_s": round(sequential, 1), "audiodata_items_per_s": round(ours, 1),
            "ceiling_items_per_s": round(ceiling, 1), "fraction_of_ceiling": round(ours / ceiling, 3),
            "speedup_vs_sequential": round(ours / sequential, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=480)
    parser.add_argument("--sequential-items", type=int, default=60)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds the server adds per request")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="downloads in flight (default: the web sources' fetch_concurrency)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    if args.concurrency is None:
        from pipelines.freesound import FreesoundSource

        args.concurrency = FreesoundSource.fetch_concurrency
    result = run(args.items, args.latency, args.concurrency, args.sequential_items)
    print(json.dumps(result, indent=2))
    print(f"\n| in flight | latency | sequential items/s | audiodata items/s | ceiling items/s | fraction of ceiling |"
          f"\n|---|---|---|---|---|---|\n| {result['concurrency']} | {result['latency_s'] * 1000:.0f} ms | "
          f"{result['sequential_items_per_s']} | {result['audiodata_items_per_s']} | {result['ceiling_items_per_s']} | "
          f"{result['fraction_of_ceiling']} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["fraction_of_ceiling"] >= 0.8 else 1


if __name__ == "__main__":
    sys.exit(main())
