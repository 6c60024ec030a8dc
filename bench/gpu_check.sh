#!/usr/bin/env bash
# GPU checks in one short run, for a lent GPU machine whose Python lacks some of the project's packages.
#
# What it measures (each part under its own time limit, results under $OUT):
#   B. the default pipeline (every dvc.yaml stage command, in order) on the GPU, then `python -m pipeline.verify`
#      against the committed CPU results: verdicts, largest feature and metric differences;
#   A. the fine-tune seed spread on the default data for a few `finetune` variants (bench/finetune_seeds.py);
#   C. extraction throughput, bf16, against the textbook loop (bench/extract.py): the PIL route and the JPEG route
#      (nvJPEG) with each JPEG decoder that works there (TorchCodec, torchvision), side by side; then the GPU test of
#      the JPEG route's pixels against PIL's on hymenoptera, where pytest and the data set are there.
# Packages missing there travel as pure-Python copies in .devsite/pure (dvc's and dvclive's modules that dvclive
# imports, timm 1.0.31 and the bundled Lite0 weights): a .pth file puts them first on that Python's path.
#
#     bash bench/gpu_check.sh                 # on the GPU machine, from the repo root; OUT=folder for the results
#     PARTS=C bash bench/gpu_check.sh         # only some parts (default: BAC)
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 DVC_NO_ANALYTICS=1 TQDM_DISABLE=1
if [ -d .devsite/pure ]; then
  site=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "import sys; sys.path.insert(0, '$PWD/.devsite/pure')" > "$site/000_devsite.pth"
fi
# stage commands say `python`; a wrapper, not a symlink, so that a venv's python3 stays in its venv
mkdir -p /tmp/bin && rm -f /tmp/bin/python && printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" > /tmp/bin/python && chmod +x /tmp/bin/python
export PATH=/tmp/bin:$PATH

{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  lscpu | grep -m1 "Model name"; echo "cpus: $(nproc)"
  python -c "import sys, torch, torchvision, timm, sklearn, h5py, numpy; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'sklearn', sklearn.__version__, 'h5py', h5py.__version__, 'numpy', numpy.__version__)"
  python -c "import pipeline.embedded, pipeline.prepare, pipeline.extract, pipeline.heads, pipeline.select, pipeline.finetune, pipeline.evaluate, pipeline.verify; from dvclive import Live; print('imports ok')"
} 2>&1 | tee "$OUT/env.txt"
grep -q "imports ok" "$OUT/env.txt" || { echo "environment not usable: see env.txt"; exit 3; }
if ! git rev-parse HEAD >/dev/null 2>&1; then  # verify compares with git HEAD: make the travelled tree the HEAD
  git init -q && git add -A && git -c user.email=gpu@check -c user.name=gpu commit -qm "as travelled"
fi

PARTS=${PARTS:-BAC}
if [[ $PARTS == *B* ]]; then
echo "== B: default pipeline on the GPU" | tee "$OUT/pipeline.log"
timeout "${LIMIT_B:-170}" python - <<'EOF' 2>&1 | grep -v "it/s\]" | tee -a "$OUT/pipeline.log"
import subprocess, time, yaml
for name, stage in yaml.safe_load(open("dvc.yaml"))["stages"].items():
    cmds = ([stage["do"]["cmd"].replace("${item}", str(i)) for i in stage["foreach"]] if "foreach" in stage
            else [stage["cmd"]])
    for cmd in cmds:
        t0 = time.perf_counter()
        subprocess.run(cmd, shell=True, check=True)
        print(f":: {name}: {time.perf_counter() - t0:.1f} s  ({cmd.split(' --')[0]})", flush=True)
EOF
{
  timeout 90 python -m pipeline.verify
  echo "== files that differ from the committed CPU results"; git status --porcelain -- metrics plots report dvclive
  echo "== output files: md5 here vs dvc.lock (the committed CPU run)"
  python - <<'PY'
import hashlib, os, yaml
for name, stage in yaml.safe_load(open("dvc.lock"))["stages"].items():
    for out in stage.get("outs", []):
        if os.path.isfile(out["path"]):
            here = hashlib.md5(open(out["path"], "rb").read()).hexdigest()
            print(f"{out['path']:40s} {'same' if here == out['md5'] else 'differs'} ({out['md5'][:10]} -> {here[:10]})")
PY
  cat metrics/evaluate.json
} 2>&1 | tee "$OUT/verify.log"
fi

if [[ $PARTS == *A* ]]; then
echo "== A: fine-tune seed spread on the GPU" | tee "$OUT/seeds.log"
timeout "${LIMIT_A:-270}" python bench/finetune_seeds.py --data data/digits --work /tmp/seeds --seeds 0 1 2 \
  --variant "" --variant "ema_decay=0.99" --variant "select=loss" --variant "ema_decay=0.99,select=loss" 2>&1 \
  | grep -v " INFO " | tee -a "$OUT/seeds.log"
fi

if [[ $PARTS == *C* ]]; then
echo "== C: extraction throughput: PIL route, JPEG route with each decoder, textbook loop" | tee "$OUT/extract.log"
# TorchCodec has no wheel for some torch releases (none for 2.11): then the JPEG route has torchvision's alone
decodes=$(python - 2>>"$OUT/extract.log" <<'PY'
import sys, torch
from pipeline.core.features.jpeg_decoders import why_unusable
reason = why_unusable("torchcodec", torch.device("cuda"))
print("pil,torchcodec,torchvision" if reason is None else "pil,torchvision")
if reason:
    print("torchcodec not usable here:", reason, file=sys.stderr)
PY
)
decodes=${decodes:-pil,torchvision}
echo "routes timed: $decodes" | tee -a "$OUT/extract.log"
timeout "${LIMIT_C:-150}" python bench/extract.py --generate 3000 --batch-size 256 --workers 14 --precision bf16 \
  --decode "$decodes" --no-parts --rss-n 1000 2>&1 | grep -v " INFO " | tee -a "$OUT/extract.log"
timeout 120 python -m pytest -q -p no:cacheprovider tests/features/test_extract.py -k nvjpeg 2>&1 | tail -5 \
  | tee -a "$OUT/extract.log"
fi
echo "done at $(date -u)"
