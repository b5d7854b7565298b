#!/usr/bin/env bash
# GPU check of parscale-edge on the lent NVIDIA H100 (what it measures: bench/gpu_check.py).
#
# PLAN. Device limits: 15 min of machine time in all (start-up 1-3 min included), one command
# <= 10 min, <= 64 MiB per call for the working tree and the carried paths together, machine
# released after 30 s idle (so: make the calls back to back, no pause between them). The machine
# has python3 3.12, torch 2.11 + NVIDIA's CUDA 13 / cuDNN 9 wheels, onnx, onnxruntime 1.30 (CPU)
# and no network; onnxruntime-gpu 1.31.1 (wheel 243.7 MiB) cannot travel in one call, so only the
# files its CUDA provider path needs travel, compressed, in parts (measured 2026-12-06, this script):
#   onnxruntime/ of the cp312 wheel without libonnxruntime_providers_tensorrt.so and
#   libonnxruntime.so.1.31.1 (nothing loads them): 304.7 MiB (the CUDA provider 270.9 of it).
#   xz -9e: 185.4 MiB (528 s); zstd --ultra -22 --long=31: 186.3 MiB (505 s); xz --x86 -9e
#   (BCJ filter for the x86 code): 184.1 MiB (390 s), used: the smallest, and xz-utils (or
#   python's lzma) is on every Linux, zstd is not sure to be on the machine.
#   Tree (git ls-files + untracked, not ignored) 27.8 MiB on 2026-12-06; parts <= 64 - 1 (margin)
#   - tree MiB: 6 equal parts of 30.7 MiB, which leave the tree 4.5 MiB to grow (5 parts of 36.8
#   MiB fit only a tree under 26.2 MiB). --calls checks the tree of the day, --resplit re-cuts.
#
# | call  | carry                        | tree + carry MiB   | command (timeout_s)                      | minutes              |
# | 1     | .gpu-carry/part-1 (30.7 MiB) | 27.8 + 30.7 = 58.5 | bash bench/gpu_check.sh --receive 1 (60) | start 3 min, 0.5 min |
# | 2     | .gpu-carry/part-2 (30.7 MiB) | 27.8 + 30.7 = 58.5 | bash bench/gpu_check.sh --receive 2 (60) | 0.5 min              |
# | 3     | .gpu-carry/part-3 (30.7 MiB) | 27.8 + 30.7 = 58.5 | bash bench/gpu_check.sh --receive 3 (60) | 0.5 min              |
# | 4     | .gpu-carry/part-4 (30.7 MiB) | 27.8 + 30.7 = 58.5 | bash bench/gpu_check.sh --receive 4 (60) | 0.5 min              |
# | 5     | .gpu-carry/part-5 (30.7 MiB) | 27.8 + 30.7 = 58.5 | bash bench/gpu_check.sh --receive 5 (60) | 0.5 min              |
# | 6     | .gpu-carry/part-6 (30.7 MiB) | 27.8 + 30.7 = 58.5 | bash bench/gpu_check.sh --device (480)   | 7 min                |
# | total |                              |                    |                                          | 12.5 of 15           |
# (0.5 min per part call is an estimate: ~59 MiB to send and a sha256; the 2.5 min left over are the
# slack for slow transfers and the gaps between calls, each under 30 s or the parts are lost.)
#
# The final command: assemble (< 0.5 min), then bench/gpu_check.py run with a deadline that ends
# the command within 7 min: pytest golden/export tests on CUDA, accuracy (fp32 <= 1e-3 of the CPU,
# fp16 top-1 >= 99%, int4 against the CPU's int4, every compute op on CUDA by ONNX Runtime's
# profiler), the profile of qwen2.5-coder-0.5b shapes at P=1,2,4,8 and its dense twins (fp16, int4;
# batch 1 and 8; TTFT, decode ms/token, GPU memory), the paper's ratios beside 22x / 6x, and last
# (90 s reserved) int4 smollm2-135m-shaped decode at P=1,2,4,8 on 1,2,4,8,16 CPU threads.
# Results: bench/results/gpu_check/ there, and in $OUT (<= 8 files: the folder as a .tar.gz, the log,
# summary.json, paper_ratios.md, cpu_threads.md) for the session to commit.
#
# Usage (the device tool sends the checkout its session started in: prepare the parts there):
#   bench/gpu_check.sh --prepare     here (PyPI, ~7 min, cached after): download, pack, compress, split
#                                    into .gpu-carry/part-K (git ignores it); prints the device calls
#   bench/gpu_check.sh --calls       print the device calls again (re-checks the sizes)
#   bench/gpu_check.sh --resplit     split the prepared archive again for the tree of now (offline)
#   bench/gpu_check.sh --receive K   (device) check part K's sha256 on arrival
#   bench/gpu_check.sh --assemble    (device) check every part, unpack into $SITE, import check
#   bench/gpu_check.sh [--device] [gpu_check.py run options]   (device, last call) assemble + the check
#   bench/gpu_check.sh --dry-run     rehearse all of it on a CPU: the real parts, the size checks,
#                                    receive/assemble, the overlay (import check with this Python's
#                                    wheel of the same version), the check with tiny models under
#                                    that onnxruntime-gpu, the CPU thread step, the $OUT bundle
# Environment: PYTHON (python3), CARRY (.gpu-carry), SITE (/tmp/parscale-gpu-site), OUT (device).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CARRY=${CARRY:-.gpu-carry}
SITE=${SITE:-/tmp/parscale-gpu-site}
ORT_GPU=1.31.1                 # newest onnxruntime-gpu on PyPI; >= parscale_edge.runtime.FUSED_MIN_ORT
DEVICE_PY=3.12                 # the GPU machine's python3
LIMIT_MIB=${LIMIT_MIB:-64} MARGIN_MIB=${MARGIN_MIB:-1}   # per call: tree + carry <= 63 MiB
FINAL_S=420                    # the last command's limit (7 min)
START_MIN=3 PART_MIN=0.5       # plan: machine start (worst), one part call (transfer + check)
ARCHIVE=ort-gpu-$ORT_GPU-cp${DEVICE_PY/./}.tar.xz
EXCLUDE=('onnxruntime/capi/libonnxruntime_providers_tensorrt.so' 'onnxruntime/capi/libonnxruntime.so.*')

log() { echo "[gpu_check.sh $(date +%H:%M:%S)] $*" >&2; }
die() { echo "error: $*" >&2; exit 2; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }

# bytes that travel with every call: tracked files that exist and untracked files git does not ignore
tree_bytes() {
    git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s -- 2>/dev/null \
        | awk '{ s += $1 } END { print s + 0 }'
}
parts() { ls -d "$CARRY"/part-* 2>/dev/null | sort -V; }
nparts() { parts | wc -l; }

# the wheel of onnxruntime-gpu for Python $1 (pip download, cached in $CARRY/build)
wheel() {
    local tag=cp${1/./} dir=$CARRY/build/wheels
    local w; w=$(ls "$dir"/onnxruntime_gpu-$ORT_GPU-$tag-*.whl 2>/dev/null | head -n 1 || true)
    if [[ -z $w ]]; then
        log "pip download onnxruntime-gpu==$ORT_GPU for Python $1"
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$1" --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 -d "$dir" "onnxruntime-gpu==$ORT_GPU" >&2 || die "pip download failed (needs PyPI)"
        w=$(ls "$dir"/onnxruntime_gpu-$ORT_GPU-$tag-*.whl | head -n 1)
    fi
    echo "$w"
}

# the members the CUDA provider path needs, unpacked from wheel $1 into folder $2
unpack_wheel() {
    rm -rf "$2" && mkdir -p "$2"
    unzip -q "$1" -d "$2" -x "${EXCLUDE[@]}"
}

cmd_prepare() {
    command -v unzip >/dev/null && command -v xz >/dev/null || die "--prepare needs unzip and xz"
    mkdir -p "$CARRY/build"
    local w; w=$(wheel "$DEVICE_PY")
    local sum; sum=$(sha256sum "$w" | cut -c1-64)
    local arc=$CARRY/build/$ARCHIVE
    if [[ ! -s $arc || "$(cat "$arc.wheel-sha256" 2>/dev/null)" != "$sum" ]]; then
        log "packing $(basename "$w") ($(mib "$(stat -c %s "$w")") MiB) without TensorRT and the C API library"
        unpack_wheel "$w" "$CARRY/build/files"
        log "xz --x86 -9e of $(mib "$(du -sb "$CARRY/build/files" | cut -f1)") MiB (one thread: about 10 minutes)"
        tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$CARRY/build/files" -cf - . \
            | xz -T1 --x86 --lzma2=preset=9e > "$arc.tmp"
        mv "$arc.tmp" "$arc" && echo "$sum" > "$arc.wheel-sha256"
        rm -rf "$CARRY/build/files"
    fi
    split_parts "$arc"
    cmd_calls
}

# cut the archive into the fewest equal parts that fit next to the tree; a MANIFEST in every part
split_parts() {
    local arc=$1 size tree room n each
    size=$(stat -c %s "$arc"); tree=$(tree_bytes)
    room=$(( (LIMIT_MIB - MARGIN_MIB) * 1048576 - tree ))
    (( room > 1048576 )) || die "the tree alone ($(mib "$tree") MiB) leaves no room under $LIMIT_MIB MiB"
    n=$(( (size + room - 1) / room )); each=$(( (size + n - 1) / n ))
    rm -rf "$CARRY"/part-* "$CARRY/build/split" && mkdir -p "$CARRY/build/split"
    split -b "$each" -d -a 2 "$arc" "$CARRY/build/split/$ARCHIVE."
    local k=0 f
    for f in "$CARRY"/build/split/*; do
        k=$((k + 1)); mkdir -p "$CARRY/part-$k"; mv "$f" "$CARRY/part-$k/"
    done
    (cd "$CARRY" && sha256sum part-*/"$ARCHIVE".* | sort -k2,2V > build/SHA256SUMS
     cd build && sha256sum "$ARCHIVE" > ARCHIVE.sha256)
    for f in $(parts); do cp "$CARRY/build/SHA256SUMS" "$CARRY/build/ARCHIVE.sha256" "$f/"; done
    log "$(mib "$size") MiB in $n parts of <= $(mib "$each") MiB (tree $(mib "$tree") MiB)"
}

# the device calls, after checking every call's size against the limit
cmd_calls() {
    local n tree k bytes total=0 ok=1
    n=$(nparts); (( n > 0 )) || die "no parts in $CARRY: run bench/gpu_check.sh --prepare here first"
    tree=$(tree_bytes)
    echo "device calls (back to back: the machine goes back after 30 s idle); tree $(mib "$tree") MiB:"
    for k in $(seq 1 "$n"); do
        bytes=$(( tree + $(du -sb "$CARRY/part-$k" | cut -f1) ))
        (( bytes <= LIMIT_MIB * 1048576 )) || ok=0
        if (( k < n )); then
            echo "  call $k: run(carry=[\"$CARRY/part-$k\"], command=\"bash bench/gpu_check.sh --receive $k\", timeout_s=60)   # $(mib "$bytes") MiB, ~$PART_MIN min"
        else
            echo "  call $k: run(carry=[\"$CARRY/part-$k\"], command=\"bash bench/gpu_check.sh --device\", timeout_s=480)   # $(mib "$bytes") MiB, <= $((FINAL_S / 60)) min"
        fi
    done
    total=$(awk -v n="$n" -v s="$START_MIN" -v p="$PART_MIN" -v f="$FINAL_S" 'BEGIN { printf "%.1f", s + (n - 1) * p + f / 60 }')
    echo "  then: commit bench/results/gpu_check/ from the files of \$OUT (gpu_check-results.tar.gz), give_back"
    echo "plan: $n calls, <= $total min of the 15 (start $START_MIN, $((n - 1)) x $PART_MIN, final $((FINAL_S / 60)))"
    (( ok )) || die "a call is over $LIMIT_MIB MiB: run --prepare again (it re-splits for the tree of now)"
    awk -v t="$total" 'BEGIN { exit !(t <= 15) }' || die "the plan needs $total min, more than 15"
}

cmd_receive() {
    local k=$1 d=$CARRY/part-$1
    [[ -f $d/SHA256SUMS ]] || die "part $k is not here ($d): carry it"
    (cd "$CARRY" && grep " part-$k/" "part-$k/SHA256SUMS" | sha256sum -c --quiet -) || die "part $k is damaged"
    echo "part $k of $(wc -l < "$d/SHA256SUMS") ok; here: $(parts | xargs -n1 basename | tr '\n' ' ')"
    if [[ $k == 1 ]]; then  # what the last call relies on, seen early (seconds)
        { nvidia-smi -L 2>&1 | head -n 2 || true; command -v xz || echo "no xz: python's lzma will unpack"
          "$PY" -c 'import sys, importlib.metadata as m; print(sys.version.split()[0], *(f"{p} {m.version(p)}" for p in ("torch", "onnxruntime", "onnx")))' || true
          df -h /tmp | tail -n 1 || true; nproc; } 2>&1 | sed 's/^/  machine: /' || true
    fi
}

# check and join every part, unpack into $SITE; $1 = "import" to import-check it with $PY
cmd_assemble() {
    local any; any=$(parts | tail -n 1)
    [[ -n $any ]] || die "no parts in $CARRY: make every call of the plan, back to back"
    local missing; missing=$(awk '{ sub("/.*", "", $2); print $2 }' "$any/SHA256SUMS" \
        | while read -r p; do [[ -d $CARRY/$p ]] || echo "$p"; done | tr '\n' ' ')
    [[ -z $missing ]] || die "missing: $missing(the machine was given back between calls? start again at call 1)"
    (cd "$CARRY" && sha256sum -c --quiet "${any#"$CARRY"/}/SHA256SUMS") || die "a part is damaged"
    local tmp abs; tmp=$(mktemp -d); abs=$(cd "$any" && pwd)
    (cd "$CARRY" && awk '{ print $2 }' "${any#"$CARRY"/}/SHA256SUMS" | xargs cat) > "$tmp/$ARCHIVE"
    (cd "$tmp" && sha256sum -c --quiet "$abs/ARCHIVE.sha256") || die "the joined archive is damaged"
    rm -rf "$SITE" && mkdir -p "$SITE"
    if command -v xz >/dev/null; then
        xz -dc "$tmp/$ARCHIVE" | tar -x -C "$SITE"
    else
        "$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2])' "$tmp/$ARCHIVE" "$SITE"
    fi
    rm -rf "$tmp"
    log "onnxruntime-gpu $ORT_GPU unpacked into $SITE ($(du -sm "$SITE" | cut -f1) MiB)"
    [[ ${1:-} == import ]] && import_check "$SITE"
    return 0
}

# the overlay $1 shadows the installed onnxruntime: its version, its file, the CUDA provider listed
import_check() {
    PYTHONPATH="$1" "$PY" -c '
import sys, onnxruntime as o
assert o.__file__.startswith(sys.argv[1]), f"onnxruntime comes from {o.__file__}, not the overlay"
assert o.__version__ == sys.argv[2], o.__version__
assert "CUDAExecutionProvider" in o.get_available_providers(), o.get_available_providers()
print(f"import ok: onnxruntime {o.__version__} from {o.__file__}; {o.get_available_providers()}")' "$1" "$ORT_GPU"
}

cuda_libs() {  # NVIDIA's CUDA/cuDNN pip wheels beside torch (nvidia/cu13/lib, nvidia/cudnn/lib, ...)
    "$PY" -c 'import glob, site; print(":".join(sorted({d for p in site.getsitepackages() for d in glob.glob(p + "/nvidia/*/lib") + glob.glob(p + "/nvidia/*/*/lib")})))'
}

# results -> $1 (at most 8 files, each <= 16 MiB)
bundle() {
    local res=$1 out=$2
    mkdir -p "$out"
    tar -czf "$out/gpu_check-results.tar.gz" -C "$(dirname "$res")" "$(basename "$res")"
    for f in summary.json paper_ratios.md cpu_threads.md; do [[ -f $res/$f ]] && cp "$res/$f" "$out/"; done
    local n big; n=$(find "$out" -type f | wc -l); big=$(find "$out" -type f -size +16M | wc -l)
    (( n <= 8 && big == 0 )) || die "\$OUT holds $n files ($big over 16 MiB): at most 8 come back"
    log "\$OUT: $(ls "$out" | tr '\n' ' ')"
}

# the package from this source tree without installing it (the device has no pip index): a folder
# holding parscale_edge/ as links to edge/*, with export/, quant/, demo/ beside them, the layout
# that pyproject's package-dir gives an install -> prints the folder to put on PYTHONPATH
source_package() {
    local dir; dir=$(mktemp -d) && mkdir "$dir/parscale_edge"
    ln -s "$PWD"/edge/* "$dir/parscale_edge/"
    local sub; for sub in export quant demo; do ln -s "$PWD/$sub" "$dir/parscale_edge/$sub"; done
    echo "$dir"
}

# the check with overlay $1 into results $2, in what is left of FINAL_S since $3 ($SECONDS at the
# final command's start), then the bundle into $OUT; the rest: gpu_check.py run options
run_check() {
    local site=$1 res=$2 t0=$3 rc=0 libs left; shift 3
    libs=$(cuda_libs)
    left=$(( FINAL_S - (SECONDS - t0) - 25 ))  # 25 s: the bundle and the timeout's margin
    PYTHONPATH="$site:$(source_package):$PWD${PYTHONPATH:+:$PYTHONPATH}" LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
        PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 \
        timeout --kill-after=5 $(( left + 10 )) "$PY" bench/gpu_check.py run --deadline-s "$left" -o "$res" "$@" || rc=$?
    if [[ -n ${OUT:-} ]]; then bundle "$res" "$OUT"; fi
    log "final command: $(( SECONDS - t0 )) s of $FINAL_S (exit $rc)"
    return $rc
}

# the final command: assemble, the check, the bundle
cmd_device() {
    local t0=$SECONDS
    nvidia-smi -L >/dev/null 2>&1 || die "nvidia-smi finds no NVIDIA GPU here; run with --dry-run on a CPU"
    if [[ -n ${OUT:-} ]]; then mkdir -p "$OUT"; exec > >(tee "$OUT/gpu_check.log") 2>&1; fi  # the whole log back
    cmd_assemble import
    run_check "$SITE" bench/results/gpu_check "$t0" "$@"
}

cmd_dry_run() {
    local t0=$SECONDS
    command -v unzip >/dev/null || die "--dry-run needs unzip"
    cmd_prepare >/dev/null                             # the real parts (PyPI once; cached after)
    local t_prep=$((SECONDS - t0))
    cmd_calls                                          # every call's size against the limit
    local n k; n=$(nparts)
    for k in $(seq 1 "$n"); do cmd_receive "$k"; done
    local t_final=$SECONDS                             # the final command starts: assemble, check, bundle
    export OUT=$CARRY/build/dry-out                    # stands for the device's $OUT
    rm -rf "$OUT" && mkdir -p "$OUT" && exec > >(tee "$OUT/gpu_check.log") 2>&1
    local dev_site=$SITE-dry-cp${DEVICE_PY/./}
    SITE=$dev_site cmd_assemble                        # the device's files: same list and sizes as the wheel's
    local want got
    want=$(unzip -Z1 "$(wheel "$DEVICE_PY")" | grep -v '/$' | grep -v -x -e 'onnxruntime/capi/libonnxruntime_providers_tensorrt\.so' -e 'onnxruntime/capi/libonnxruntime\.so\..*' | sort | md5sum)
    got=$(cd "$dev_site" && find . -type f | sed 's|^\./||' | sort | md5sum)
    [[ $want == "$got" ]] || die "the assembled overlay's file list differs from the wheel's"
    cmp -s "$dev_site/onnxruntime/capi/libonnxruntime_providers_cuda.so" \
        <(unzip -p "$(wheel "$DEVICE_PY")" onnxruntime/capi/libonnxruntime_providers_cuda.so) \
        || die "libonnxruntime_providers_cuda.so differs from the wheel's"
    log "assembled overlay = the wheel's files (CUDA provider byte for byte); its cp${DEVICE_PY/./} module cannot import here"
    rm -rf "$dev_site"
    local pyv; pyv=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    local site=$SITE-dry                               # this Python's wheel, same version and members
    unpack_wheel "$(wheel "$pyv")" "$site"
    import_check "$site"
    local rc=0
    run_check "$site" "$CARRY/build/dry-results" "$t_final" --dry-run "$@" || rc=$?
    rm -rf "$site"
    log "dry run: $((SECONDS - t0)) s (prepare, cached: $t_prep s; the final command's part: $((SECONDS - t_final)) s of $FINAL_S); exit $rc"
    return $rc
}

case "${1:-}" in
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    --prepare) cmd_prepare ;;
    --calls) cmd_calls ;;
    --resplit) [[ -s $CARRY/build/$ARCHIVE ]] || die "no $CARRY/build/$ARCHIVE: run --prepare"
               split_parts "$CARRY/build/$ARCHIVE" && cmd_calls ;;
    --receive) [[ -n ${2:-} ]] || die "--receive K"; cmd_receive "$2" ;;
    --assemble) cmd_assemble import ;;
    --dry-run) shift; cmd_dry_run "$@" ;;
    --device) shift; cmd_device "$@" ;;
    *) cmd_device "$@" ;;
esac
