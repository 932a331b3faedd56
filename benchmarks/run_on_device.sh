#!/usr/bin/env bash
# Run GPU work on the device machine (no `pip install -e` there): copy the package into /tmp/pkg the way the
# wheel lays it out, install carried wheels (diffusers, importlib_metadata in .whl/) into /tmp/site, then run
# the named jobs in order. Outputs go to $OUT (the device tool brings them back).
#
#   bash benchmarks/run_on_device.sh na-a            # NA: forward (3 permutation modes), e2e 2048-px step, fwd+bwd
#   bash benchmarks/run_on_device.sh na-b            # NA: 64x64 blocks, Flex same layout / untiled / backward
#   bash benchmarks/run_on_device.sh na-issue        # NA: what the issue names beyond the forward (e2e step, Flex)
#   bash benchmarks/run_on_device.sh gpu-tests       # every test marked gpu
#   bash benchmarks/run_on_device.sh na-fwd          # NA: the forward section only (~4 min)
#   bash benchmarks/run_on_device.sh gather          # token gather vs index_select; e2e-shaped NA call per mode
#   bash benchmarks/run_on_device.sh agent routing consistent
#   bash benchmarks/run_on_device.sh na-tiles        # NA: 256-row query tiles vs the default (probe, ~3 min)
#   bash benchmarks/run_on_device.sh na-kernel       # NA: forward-kernel variants (partial-mask bits, stages) (~4 min)
#   bash benchmarks/run_on_device.sh na-e2e          # NA: the instrumented e2e step + 64x64 blocks (~3 min)
#   bash benchmarks/run_on_device.sh train-probe     # default model: training-step timings (eager vs CUDA graph)
#   bash benchmarks/run_on_device.sh train           # the default model from scratch (about 9 minutes) + its evaluation
#   TRAIN_SET="t_focus_frac=0.35 unet_time=340" bash benchmarks/run_on_device.sh train   # with config overrides
#
# Each job fits one 10-minute device call; give the call `carry: [".whl"]` when a job needs diffusers.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/pkg
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
fi
rm -rf /tmp/pkg/visattn
cp -r visattn /tmp/pkg/ && cp -r kernels /tmp/pkg/visattn/kernels && cp -r pipelines /tmp/pkg/visattn/pipelines \
  && cp -r demos /tmp/pkg/visattn/demos && cp -r benchmarks tests /tmp/pkg/ || exit 3
export PYTHONPATH=/tmp/pkg:/tmp/site
cd /tmp/pkg || exit 3
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader

for job in "$@"; do
  echo "=== $job"
  case "$job" in
    na-a) timeout 470 python3 benchmarks/bench_neighborhood.py --sections fwd,e2e,fwdbwd --budget-s 430 \
            --out "$OUT/na_h100_a.json" 2>&1 | tail -40 ;;
    na-b) timeout 470 python3 benchmarks/bench_neighborhood.py --sections 64x64,flex,flex-untiled,flex-bwd \
            --budget-s 430 --out "$OUT/na_h100_b.json" 2>&1 | tail -40 ;;
    na-issue) timeout 560 python3 benchmarks/bench_neighborhood.py --sections e2e,flex,flex-untiled --budget-s 520 \
            --out "$OUT/na_h100_issue.json" 2>&1 | tail -40 ;;
    na-tiles) timeout 240 python3 benchmarks/probe_na_tiles.py --budget-s 200 --out "$OUT/na_tiles_probe.json" 2>&1 \
            | grep -v -i warn | tail -40 ;;
    na-kernel)  # KCASES / KMODES / KCONF (JSON [[block, config-or-null], ...]) override the defaults
      conf='[[[128,64],null],[[128,64],{"bits":"reshape"}],[[128,64],{"num_stages":2}],[[128,64],{"num_stages":2,"bits":"reshape"}]]'
      timeout 560 python3 benchmarks/probe_na_tiles.py --cases "${KCASES:-2d-na,3d-na}" --modes "${KMODES:-fused_q}" \
        --budget-s 500 --nomask --configs "${KCONF:-$conf}" --out "$OUT/na_kernel_probe.json" 2>&1 \
        | grep -v -i warn | tail -30 ;;
    na-e2e) timeout 200 python3 benchmarks/bench_neighborhood.py --sections e2e,64x64 --budget-s 170 \
            --out "$OUT/na_h100_e2e.json" 2>&1 | tail -30 ;;
    train-probe) timeout 60 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_train_default.py 2>&1 | tail -5
            timeout 330 python3 benchmarks/bench_train_default.py --profile --batches 256 \
              --modes "${PROBE_MODES:-eager,graph,cl,cl-graph,compile}" --out "$OUT/train_default_h100.json" 2>&1 \
              | grep -v -i warn | tail -60 ;;
    gpu-tests) # shellcheck disable=SC2086  # GPU_TESTS: test paths (default: all of tests/); GPU_MARK="" runs every test in them
      timeout "${GPU_TESTS_S:-500}" python3 -m pytest -q -p no:cacheprovider -m "${GPU_MARK-gpu}" -rfEs --durations=8 ${GPU_TESTS:-tests} 2>&1 | tail -40 ;;
    gather) timeout 200 python3 benchmarks/probe_gather.py --out "$OUT/gather_probe.json" 2>&1 | grep -v -i warn | tail -8 ;;
    na-fwd) timeout 330 python3 benchmarks/bench_neighborhood.py --sections fwd --budget-s 300 \
            --out "$OUT/neighborhood_h100_fwd.json" 2>&1 | tail -30 ;;
    agent) timeout 240 python3 benchmarks/bench_agent.py --kernels --out "$OUT/bench_agent_h100.json" 2>&1 | tail -20 ;;
    routing) timeout 120 python3 benchmarks/bench_routing.py --split --out "$OUT/routing_h100.json" 2>&1 | tail -20 ;;
    consistent)
      timeout 120 python3 benchmarks/bench_consistent_attention.py --device cuda \
        --out "$OUT/consistent_attention_h100.json" 2>&1 | tail -5
      timeout 240 python3 benchmarks/bench_consistent_memory.py --out "$OUT/consistent_memory_h100.json" 2>&1 | tail -5 ;;
    train)
      # shellcheck disable=SC2086  # TRAIN_SET: space-separated key=json overrides, e.g. "t_focus_frac=0.35 unet_time=340"
      timeout 545 python3 -m visattn.pipelines.train_default --out /tmp/run --pack-dir "$OUT" \
        ${TRAIN_SET:+--set $TRAIN_SET} 2>&1 \
        | grep -v -i -E "warn|shards|should be kept" | tee "$OUT/train_stdout.txt" | tail -30
      [ -f /tmp/run/shapes_classifier.safetensors ] || { echo "training did not finish: no evaluation"; exit 1; }
      python3 -m visattn.pipelines.eval_default --model /tmp/run/shapes_sd \
        --classifier /tmp/run/shapes_classifier.safetensors --device cuda --n 200 --guidance 2.5 4 \
        --sizes 128 256 --json "$OUT/eval.json" --grid "$OUT/default_samples.png" --grid-sizes 128 256 512 2>&1 \
        | grep -v -i -E "warn|Loading|accelerate" | tail -8 ;;
    *) echo "unknown job $job (allowed: na-a, na-b, na-issue, na-e2e, na-tiles, na-kernel, na-fwd, gather, train-probe, gpu-tests, agent, routing, consistent, train)"; exit 2 ;;
  esac
done
