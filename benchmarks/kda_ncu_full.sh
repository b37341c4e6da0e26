# Nsight Compute's full set on one launch of one of our chunk kernels (one 8K call), with the
# per-instruction stall samples: the report, its details page and its SASS source page (CSV) go to
# DIR. On the GPU machine, after `. benchmarks/gpu_env.sh && cd /tmp`:
#   bash $REPO/benchmarks/kda_ncu_full.sh DIR [KERNEL_REGEX] [kda_once.py options]
# KERNEL_REGEX defaults to the scores kernel (kda_chunk_scores).
DIR=${1:?usage: kda_ncu_full.sh DIR [KERNEL_REGEX] [kda_once.py options]}
KERNEL=${2:-kda_chunk_scores}
shift; shift
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
NAME=$(echo "$KERNEL" | tr -c 'A-Za-z0-9_\n' '_')
$NCU -k "regex:$KERNEL" --launch-count 1 --set full --import-source yes -f -o "$DIR/$NAME" \
  python3 "$REPO"/benchmarks/kda_once.py "$@" > "$DIR/$NAME.profile.log" 2>&1
$NCU -i "$DIR/$NAME.ncu-rep" --page details > "$DIR/$NAME.details.txt" 2>&1
$NCU -i "$DIR/$NAME.ncu-rep" --page source --csv --print-source sass > "$DIR/$NAME.sass.csv" 2>&1
tail -3 "$DIR/$NAME.profile.log"
grep -E "Duration|Registers Per|Achieved Occupancy|Warp Cycles Per Issued|Executed Ipc A|Compute \(SM\) Throughput|Memory Throughput" \
  "$DIR/$NAME.details.txt" | head -20
