// Decode runs of the Model seam (model.h): launched ahead of the host, collected in order.
#include "engine/model.h"

#include <cstring>
#include <stdexcept>

namespace pagedgpt2 {

void Model::decode_steps(const StepInputs& in, const SamplingInputs& sampling, int num_steps,
                         const int32_t* slot_mappings, int32_t* next_tokens) {
  if (!runs_.empty()) {
    throw std::logic_error("decode_steps: " + std::to_string(runs_.size()) +
                           " launched decode run(s) not collected; collect them first");
  }
  launch_decode_steps(in, sampling, num_steps, slot_mappings, false);
  collect_decode_steps(next_tokens);
}

void Model::launch_decode_steps(const StepInputs& in, const SamplingInputs& sampling,
                                int num_steps, const int32_t* slot_mappings, bool continue_run) {
  if (runs_.size() > 1) {
    throw std::logic_error("launch_decode_steps: 2 launched decode runs are not collected; at "
                           "most 1 may be when another starts");
  }
  const int S = in.num_seqs;
  StepInputs step = in;
  // continue_run: the first tokens are the last row of the previous run: still on the backend
  // while that run computes there, else known here.
  bool tokens_on_backend = false;
  std::vector<int32_t> first;
  auto feed_last_row = [&](const std::vector<int32_t>& tokens) {
    first.assign(tokens.end() - S, tokens.end());
    step.token_ids = first.data();
  };
  if (continue_run) {
    const int prev_seqs = runs_.empty() ? int(last_tokens_.size()) : runs_.back().num_seqs;
    if (prev_seqs == 0) {
      throw std::logic_error("launch_decode_steps: continue_run, but no run was launched before");
    }
    if (prev_seqs != S) {
      throw std::invalid_argument("launch_decode_steps: continue_run with " + std::to_string(S) +
                                  " sequences, but the previous run had " +
                                  std::to_string(prev_seqs));
    }
    tokens_on_backend = !runs_.empty() && runs_.back().enqueued;
    if (!tokens_on_backend) feed_last_row(runs_.empty() ? last_tokens_ : runs_.back().tokens);
  }
  DecodeRun run;
  run.num_steps = num_steps, run.num_seqs = S;
  run.enqueued = enqueue_decode_run(step, sampling, num_steps, slot_mappings, tokens_on_backend);
  if (!run.enqueued) {
    if (tokens_on_backend) {  // wait for the previous run (the only one out) to learn its tokens
      DecodeRun& prev = runs_.back();
      prev.tokens.resize(size_t(prev.num_steps) * prev.num_seqs);
      wait_decode_run(prev.tokens.data());
      prev.enqueued = false;
      feed_last_row(prev.tokens);
    }
    run.tokens.resize(size_t(num_steps) * S);
    run_steps_now(step, sampling, num_steps, slot_mappings, run.tokens.data());
  }
  runs_.push_back(std::move(run));
}

void Model::collect_decode_steps(int32_t* next_tokens) {
  if (runs_.empty()) throw std::logic_error("collect_decode_steps: no decode run was launched");
  DecodeRun& run = runs_.front();
  const size_t n = size_t(run.num_steps) * run.num_seqs;
  if (run.enqueued) {
    wait_decode_run(next_tokens);
  } else {
    std::memcpy(next_tokens, run.tokens.data(), n * sizeof(int32_t));
  }
  if (runs_.size() == 1) last_tokens_.assign(next_tokens + n - run.num_seqs, next_tokens + n);
  runs_.pop_front();
}

std::pair<int, int> Model::oldest_run_shape() const {
  if (runs_.empty()) throw std::logic_error("collect_decode_steps: no decode run was launched");
  return {runs_.front().num_steps, runs_.front().num_seqs};
}

bool Model::enqueue_decode_run(const StepInputs&, const SamplingInputs&, int, const int32_t*,
                               bool) {
  return false;
}

void Model::wait_decode_run(int32_t*) {
  throw std::logic_error("wait_decode_run: this backend enqueues no decode run");
}

void Model::run_steps_now(const StepInputs& in, const SamplingInputs& sampling, int num_steps,
                          const int32_t* slot_mappings, int32_t* next_tokens) {
  const int S = in.num_seqs;
  std::vector<int32_t> positions(in.positions, in.positions + S);
  std::vector<int32_t> context_lens(in.context_lens, in.context_lens + S);
  std::vector<int64_t> counters(sampling.counters, sampling.counters + S);
  StepInputs step = in;
  SamplingInputs s = sampling;
  step.positions = positions.data();
  step.context_lens = context_lens.data();
  s.counters = counters.data();
  for (int i = 0; i < num_steps; ++i) {
    step.slot_mapping = slot_mappings + int64_t(i) * S;
    forward_and_sample(step, s, next_tokens + int64_t(i) * S);
    step.token_ids = next_tokens + int64_t(i) * S;
    for (int q = 0; q < S; ++q) ++positions[q], ++context_lens[q], ++counters[q];
  }
}

}  // namespace pagedgpt2
