#!/usr/bin/env python3
"""transformers' WhisperFeatureExtractor (numpy path) on 30 s of speech, for the side-by-side with
`cargo bench --bench audio -- audio/mel` (benches/audio.rs): the committed espeak-ng clip tiled
to 30 s, 80 and 128 mel bins, best and median of 10 runs after one warm-up.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 /work/venvs/ref/bin/python scripts/bench-whisper-mel.py

The numpy path is the one a torch-free install runs (`_np_extract_fbank_features`: a Python loop
over 3,001 frames of np.fft.rfft, then one mel product). Where OPENBLAS_CORETYPE is set for the
machine's sake, unset it (and OPENBLAS_L2_SIZE) in this command alone to time numpy's own
kernels; threadpoolctl prints which one runs.
"""

import statistics
import time
import wave
from pathlib import Path

import numpy as np
from transformers import WhisperFeatureExtractor

CLIP = Path(__file__).resolve().parents[1] / "crates/embedfleet-models/tests/fixtures/audio/speech-16k.wav"

with wave.open(str(CLIP)) as wav:
    speech = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
samples = np.resize(speech, 480_000).astype(np.float32)

try:
    from threadpoolctl import threadpool_info

    print("BLAS:", [(i.get("internal_api"), i.get("architecture"), i.get("num_threads")) for i in threadpool_info()])
except ImportError:
    pass

for bins in (80, 128):
    extractor = WhisperFeatureExtractor(feature_size=bins)
    run = lambda: extractor._np_extract_fbank_features(samples[None], "cpu")
    run()
    times = []
    for _ in range(10):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    print(f"WhisperFeatureExtractor numpy mel/30s/{bins}: best {min(times) * 1e3:.1f} ms, median {statistics.median(times) * 1e3:.1f} ms")
