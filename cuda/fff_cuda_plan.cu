// Host-side planning (no kernels instantiated here): the automatic choice, each strategy's checks and settings, its
// scratch, and the names of the table, behind the plain functions that fff_cuda.h declares for the binding.
#include "dispatch.cuh"

namespace hf_fff_cuda {

const char* strategy_name(int strategy) {
  switch (strategy) {
    case kAuto: return "auto";
#define HF_FFF_NAME_CASE(enumerator, name, id, purpose) \
  case enumerator: return #name;
    HF_FFF_STRATEGIES(HF_FFF_NAME_CASE)
#undef HF_FFF_NAME_CASE
  }
  return "unknown";
}

Plan plan(Params& p, const Problem& problem) {
  if (p.strategy == kAuto) p.strategy = choose_strategy(p, problem);
  switch (p.strategy) {
#define HF_FFF_PLAN_CASE(enumerator, name, id, purpose) \
  case enumerator: return StrategyImpl<enumerator>::plan(p, problem);
    HF_FFF_STRATEGIES(HF_FFF_PLAN_CASE)
#undef HF_FFF_PLAN_CASE
  }
  fail("unknown strategy " + std::to_string(p.strategy));
}

void bind_scratch(Params& p, int* ints, float* floats) {
  switch (p.strategy) {
#define HF_FFF_BIND_CASE(enumerator, name, id, purpose) \
  case enumerator: StrategyImpl<enumerator>::bind(p, ints, floats); return;
    HF_FFF_STRATEGIES(HF_FFF_BIND_CASE)
#undef HF_FFF_BIND_CASE
  }
  fail("unknown strategy " + std::to_string(p.strategy));
}

}  // namespace hf_fff_cuda
