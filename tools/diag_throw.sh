#!/usr/bin/env bash
# Diagnoses a crash when the extension throws (scripts/check_errors.py fails): which C++ runtime the
# extension links and Python loads, and whether preloading the toolchain's runtime changes it.
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
so=$(ls crosslmm_ops/_C*.so | head -1)
echo "extension: $so"; ldd "$so" | grep -E "stdc\+\+|gcc_s|libc10|torch_python" 
$PY - <<'PYEOF'
import torch, crosslmm_ops._C  # noqa
maps = open("/proc/self/maps").read().split("\n")
print("loaded:", sorted({l.split()[-1] for l in maps if ("libstdc++" in l or "libgcc_s" in l)}))
PYEOF
echo "g++: $(g++ --version | head -1); toolchain libstdc++: $(g++ -print-file-name=libstdc++.so.6)"
for pre in "" "$(g++ -print-file-name=libstdc++.so.6)" "$(g++ -print-file-name=libgcc_s.so.1)"; do
  echo "--- LD_PRELOAD=${pre:-<none>}"
  LD_PRELOAD="$pre" $PY scripts/check_errors.py 2>&1 | grep -E "RuntimeError|ok|Segmentation|Error" | head -3
done
