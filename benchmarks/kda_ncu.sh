# Nsight Compute on our chunk kernels (one call at 8K): launch statistics (registers, spills,
# shared memory), occupancy, speed of light and warp stall reasons. On the GPU machine, after
# `. benchmarks/gpu_env.sh && cd /tmp`:  bash $REPO/benchmarks/kda_ncu.sh [--gated]
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
$NCU -k regex:kda --launch-count 6 --section LaunchStats --section Occupancy --section SpeedOfLight \
  --section WarpStateStats --section MemoryWorkloadAnalysis python3 "$REPO"/benchmarks/kda_once.py "$@" 2>&1 |
  grep -E "^  [a-z_]+|kda|Duration|Registers Per|Spill|Local|Achieved Occupancy|Theoretical Occupancy|Block Limit|Compute \(SM\) Throughput|Memory Throughput|DRAM Throughput|Warp Cycles Per Issued|Stall|Shared Memory Configuration Size|Dynamic Shared|Static Shared|Threads|Grid Size|L1/TEX Hit|L2 Hit|Issue Slots|Executed Ipc" |
  grep -v "^==PROF==" | head -150
