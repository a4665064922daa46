// Prints csrc/pooling/token_pool_plan.h's plan_mix for argument lines read from stdin, so that
// tests/test_token_pool.py can check the launch shapes on a machine without a GPU.
//   in:  kind track_winner rows lanes_total vec staged_bytes max_taps taps_total src_tokens sms
//   out: splits lanes groups chunks stage_slots smem most_smem
#include <cstdint>
#include <iostream>

#include "pooling/token_pool_plan.h"

int main() {
  int kind, track, vec, sms;
  int64_t rows, lanes_total, staged_bytes, max_taps, taps_total, src_tokens;
  while (std::cin >> kind >> track >> rows >> lanes_total >> vec >> staged_bytes >> max_taps >>
         taps_total >> src_tokens >> sms) {
    const crosslmm::MixPlan p = crosslmm::plan_mix(kind, track != 0, rows, lanes_total, vec, staged_bytes,
                                                   max_taps, taps_total, src_tokens, sms);
    std::cout << p.splits << ' ' << p.lanes << ' ' << p.groups << ' ' << p.chunks << ' '
              << p.stage_slots << ' ' << p.smem << ' ' << p.most_smem << '\n';
  }
  return 0;
}
