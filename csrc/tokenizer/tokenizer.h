// WordPiece tokenizer with the exact behaviour of Hugging Face's BERT pipeline
// (BertNormalizer -> BertPreTokenizer -> WordPiece -> [CLS] A [SEP] (B [SEP])).
// Pure C++17: no torch, no Python. Thread-safe: one Tokenizer is shared by all
// threads, each thread brings its own Scratch and output buffers.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstring>
#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace turbotune {
namespace tok {

struct Options {
  bool clean_text = true;
  bool handle_chinese_chars = true;
  bool strip_accents = true;
  bool lowercase = true;
  std::string unk_token = "[UNK]";
  std::string continuing_subword_prefix = "##";
  int max_input_chars_per_word = 100;
};

// Byte-keyed trie over the vocabulary; edges live in one open-addressing hash
// table, so a step is one multiply and (almost always) one probe.
class Trie {
 public:
  void build(const std::vector<std::string>& tokens);
  inline int32_t child(int32_t node, uint8_t byte) const {
    if (node == 0) return root_[byte];
    uint64_t key = (uint64_t(uint32_t(node)) << 8) | byte;
    size_t h = size_t((key * 0x9E3779B97F4A7C15ULL) >> shift_);
    for (;;) {
      uint64_t k = keys_[h];
      if (k == key) return vals_[h];
      if (k == kEmpty) return -1;
      h = (h + 1) & mask_;
    }
  }
  inline int32_t token(int32_t node) const { return ids_[size_t(node)]; }
  // Node reached by walking s from the root, or -1.
  int32_t walk(const std::string& s) const;

 private:
  static constexpr uint64_t kEmpty = ~uint64_t(0);
  int32_t root_[256];
  std::vector<int32_t> ids_;  // token id ending at each node, -1 if none
  std::vector<uint64_t> keys_;
  std::vector<int32_t> vals_;
  size_t mask_ = 0;
  int shift_ = 64;
};

// Exact-match table of whole tokens: one hash probe answers "is the rest of the
// word a single token?", which is the common case (most words are in the vocabulary).
class WordTable {
 public:
  // Adds tokens; with strip_prefix, only tokens starting with prefix, keyed without it.
  void build(const std::vector<std::string>& tokens, const std::string& prefix, bool strip_prefix);
  // p must be readable up to p + n + 8 (the tail is loaded as one masked word).
  static inline uint64_t hash(const uint8_t* p, size_t n) {
    uint64_t h = 0x243F6A8885A308D3ULL ^ (n * 0x9E3779B97F4A7C15ULL);
    while (n >= 8) {
      uint64_t v;
      std::memcpy(&v, p, 8);
      h = (h ^ v) * 0xFF51AFD7ED558CCDULL;
      h ^= h >> 32;
      p += 8;
      n -= 8;
    }
    if (n) {
      uint64_t v;
      std::memcpy(&v, p, 8);
      v &= (uint64_t(1) << (8 * n)) - 1;
      h = (h ^ v) * 0xC4CEB9FE1A85EC53ULL;
    }
    return h ^ (h >> 29);
  }
  // p must be readable up to p + n + 8 (Scratch keeps 8 bytes of slack).
  inline int32_t find(const uint8_t* p, size_t n) const {
    uint64_t head;
    std::memcpy(&head, p, 8);
    if (n < 8) head &= (uint64_t(1) << (8 * n)) - 1;
    const uint64_t h = hash(p, n);
    size_t i = size_t(h >> 20) & mask_;
    const uint16_t tag = uint16_t(h);
    for (;;) {
      const Slot& s = slots_[i];
      if (s.id < 0) return -1;
      if (s.head == head && s.len == n && s.tag == tag &&
          (n <= 8 || std::memcmp(pool_.data() + s.off + 8, p + 8, n - 8) == 0))
        return s.id;
      i = (i + 1) & mask_;
    }
  }

 private:
  struct Slot {
    uint64_t head;  // first 8 bytes of the key, zero padded
    int32_t id;     // -1: empty
    uint32_t off;   // key in pool_
    uint16_t len, tag;
  };
  std::vector<Slot> slots_;
  std::string pool_;
  size_t mask_ = 0;
};

// Per-thread working memory, reused across words and texts (no allocation
// per token once it has grown to the longest word seen).
struct Scratch {
  std::vector<uint8_t> word;    // normalized UTF-8 bytes of the current word (word[0..wn))
  std::vector<int32_t> bstart;  // per byte: start of the original character (code point index)
  std::vector<int32_t> bend;    // per byte: end of the original character
  size_t wn = 0;                // bytes in the word
  int32_t nchars = 0;           // characters in the word
  // When set, receives the word index of each token (HF word_ids: the n-th non-empty
  // pre-tokenized word of the text; special tokens matched in the text count as words).
  // Kept here rather than in Sink, which stays two pointers (passed in registers).
  std::vector<int32_t>* words = nullptr;
  int32_t word_index = 0;       // index of the next pre-tokenized word of the text
  bool track = false;           // offsets requested: fill bstart / bend
  inline void reserve(size_t more) {
    if (wn + more > cap()) grow(wn + more);
  }
  size_t cap() const { return word.size() >= 8 ? word.size() - 8 : 0; }
  void grow(size_t need) {
    size_t c = std::max<size_t>(need * 2, 256);
    word.resize(c + 8);
    if (track) {
      bstart.resize(c);
      bend.resize(c);
    }
  }
  inline void put(uint8_t b, int32_t start, int32_t end) {
    word[wn] = b;
    if (track) {
      bstart[wn] = start;
      bend[wn] = end;
    }
    ++wn;
  }
  // strip_accents: pending run of characters with a non-zero combining class,
  // canonically reordered (stable sort by class, offsets stay with positions)
  // before the Mn ones are dropped, as NFD does.
  // Like HF's alignment tracking, the first character of a decomposition
  // "consumes" its source character (change 0) and the others are "inserted"
  // (change +1, aligned with the previously consumed source character); the
  // reordering moves these roles with the characters.
  struct RunChar {
    uint32_t cp;
    uint8_t ccc, mn, inserted;
    int32_t start, end;  // the source character
  };
  std::vector<RunChar> run, sorted_run;
  int32_t run_prev_start = 0, run_prev_end = 0;  // source consumed just before the run
  int32_t last_start = 0, last_end = 0;          // last source character seen
};

// A text as the caller holds it: UTF-8 bytes (kind 0), or fixed-width code
// points of 1, 2 or 4 bytes (kind 1 = Latin-1, 2 = UCS-2, 4 = UCS-4: Python's
// own string storage, read without conversion).
struct TextView {
  const void* data;
  size_t len;  // in code units (bytes for UTF-8)
  uint8_t kind;
};

// Output of one encoded text: token ids and, optionally, (start, end) offsets
// in code points of the original string, appended to caller-owned vectors
// (word indices go to Scratch::words).
struct Sink {
  std::vector<int32_t>* ids;
  std::vector<int32_t>* offsets;  // 2 ints per token, may be null
};

class Tokenizer {
 public:
  // vocab[i] is the token of id i. special_tokens are matched in the raw text
  // before normalization and never split (HF added tokens with normalized=false).
  // Throws std::invalid_argument for a vocab without unk_token or with duplicates.
  Tokenizer(std::vector<std::string> vocab, Options options, std::vector<std::string> special_tokens);

  // Appends the tokens of `text` (UTF-8) to out. Invalid UTF-8 bytes count as U+FFFD.
  void encode(const char* text, size_t len, Scratch& scratch, Sink out) const {
    encode(TextView{text, len, 0}, scratch, out);
  }
  // Same for any TextView. Returns false when the text holds a lone surrogate
  // (U+D800..U+DFFF, possible in UCS-2/UCS-4 input): it is then encoded as U+FFFD.
  bool encode(const TextView& text, Scratch& scratch, Sink out) const;

  const std::vector<std::string>& vocab() const { return vocab_; }
  const Options& options() const { return options_; }
  int32_t unk_id() const { return unk_id_; }

 private:
  void flush_word(Scratch& s, Sink out) const;
  inline void push_cp(Scratch& s, uint32_t cp, int32_t start, int32_t end) const;
  inline void emit_normalized(Scratch& s, Sink out, uint32_t cp, int32_t start, int32_t end) const;
  inline void lower_classify(Scratch& s, Sink out, uint32_t cp, int32_t start, int32_t end) const;
  inline void strip_char(Scratch& s, Sink out, uint32_t cp, bool inserted, int32_t start, int32_t end) const;
  void flush_run(Scratch& s, Sink out) const;
  template <class Src>
  bool encode_impl(const typename Src::Unit* p, const typename Src::Unit* end, Scratch& s, Sink out) const;
  template <class Unit>
  size_t match_special(const Unit* p, size_t left, bool utf8, int32_t* id, int32_t* nchars) const;

  std::vector<std::string> vocab_;
  Options options_;
  Trie trie_;
  WordTable whole_, cont_whole_;  // whole tokens; continuation tokens keyed without the prefix
  int32_t unk_id_ = -1;
  int32_t cont_root_ = -1;  // trie node of the continuation prefix ("##"), root if empty
  // ASCII fast path: 0 = part of a word (ascii_map_ gives the byte), 1 = whitespace,
  // 2 = punctuation, 3 = removed, 4 = not handled by the fast path.
  uint8_t ascii_action_[128];
  char ascii_map_[128];
  struct Special {
    std::string text;
    std::vector<uint32_t> cps;  // the same as code points
    int32_t id;
    int32_t nchars;
  };
  bool special_non_ascii_start_ = false;
  std::vector<Special> specials_;  // longest first
  bool special_first_byte_[256];
  bool ascii_plain_[128];  // action 0 and not the first byte of a special token
};

// Persistent pool: run(n, fn) calls fn(0..n-1) on the workers and the caller.
class ThreadPool {
 public:
  explicit ThreadPool(int threads);
  ~ThreadPool();
  int threads() const { return int(workers_.size()) + 1; }
  void run(int ntasks, const std::function<void(int)>& fn);

 private:
  void worker_loop();
  std::vector<std::thread> workers_;
  std::mutex run_mu_;  // one batch at a time
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(int)>* fn_ = nullptr;
  int ntasks_ = 0;
  std::atomic<int> next_{0};
  int finished_ = 0;
  int active_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

enum class Truncation { kNone = 0, kLongestFirst = 1, kOnlyFirst = 2, kOnlySecond = 3 };
enum class Padding { kNone = 0, kLongest = 1, kMaxLength = 2 };

struct EncodeParams {
  bool add_special_tokens = true;
  int32_t cls_id = -1, sep_id = -1, pad_id = 0, pad_type_id = 0;
  Truncation truncation = Truncation::kNone;
  int64_t max_length = -1;  // < 0: none
  bool truncate_left = false;
  Padding padding = Padding::kNone;
  int64_t pad_to_multiple_of = 0;
  bool pad_left = false;
  bool with_offsets = false;
  bool with_words = false;   // fill EncodedBatch::Chunk::words (word_ids / sequence_ids outputs)
  bool overflow = false;     // keep the truncated tokens as extra rows (HF return_overflowing_tokens)
  int64_t stride = 0;        // tokens repeated between consecutive overflowing rows
  int num_threads = 1;
};

// One side (texts or text pairs) of a batch. Without splits, row i is views[i].
// With splits (n + 1 non-decreasing offsets, HF is_split_into_words), row i is
// the words views[splits[i] .. splits[i + 1]), each pre-tokenized on its own:
// its tokens carry the word's index in the row and offsets within the word.
struct TextBatch {
  std::vector<TextView> views;
  std::vector<int64_t> splits;
  size_t rows() const { return splits.empty() ? views.size() : splits.size() - 1; }
};

// A batch of encoded texts (and optional pairs) before post-processing.
struct EncodedBatch {
  struct Chunk {
    std::vector<int32_t> ids, offsets, words;
  };
  struct Span {
    int32_t chunk;
    uint32_t begin, len;
  };
  // One output row: input row src, with the tokens [a_first, a_first + a_len)
  // of its first sequence and [b_first, b_first + b_len) of the pair (relative
  // to the spans). Without overflow there is one row per input row.
  struct Row {
    int64_t src;
    uint32_t a_first, a_len, b_first, b_len;
  };
  std::vector<Chunk> chunks;
  std::vector<Span> a, b;  // per input row; b is empty without pairs
  bool has_pair = false;
  // After finalize(): output rows and their length with special tokens.
  std::vector<Row> rows;
  std::vector<int32_t> length;
  // Rows are stored back to back: row i starts at row_offset[i] and is
  // width[i] >= length[i] tokens wide (the rest is padding).
  std::vector<int64_t> row_offset, width;
  int64_t total = 0;        // sum of width
  bool uniform = true;      // every row has the same width
  int64_t bad_text = -1, bad_pair = -1;  // first input row holding a lone surrogate
};

// Encodes the rows of texts (and of pairs when pairs != nullptr, with as many
// rows) with up to params.num_threads threads of pool (pool may be null for
// one thread). Rows with a lone surrogate are recorded in out.bad_text /
// out.bad_pair (first index, else -1).
void encode_batch(const Tokenizer& tok, const TextBatch& texts, const TextBatch* pairs, const EncodeParams& params,
                  ThreadPool* pool, EncodedBatch& out);

// Raw encoding without post-processing other than optional [CLS] text [SEP]:
// ids of all texts back to back (row i is ids[row_splits[i] .. row_splits[i+1])).
// One thread writes straight into `ids`; several threads fill per-task chunks
// that are then concatenated.
// Token ids of a ragged batch: one thread appends to `vec`; several threads
// copy their parts into `raw` (allocated without zero-filling, so its pages are
// first touched by the parallel copies).
struct RaggedIds {
  std::vector<int32_t> vec;
  std::unique_ptr<int32_t[]> raw;
  size_t raw_size = 0;
  const int32_t* data() const { return raw ? raw.get() : vec.data(); }
  size_t size() const { return raw ? raw_size : vec.size(); }
};

// Returns the first row holding a lone surrogate, or -1.
int64_t encode_ragged(const Tokenizer& tok, const std::vector<TextView>& texts, int32_t cls_id, int32_t sep_id,
                      int num_threads, ThreadPool* pool, RaggedIds& ids, std::vector<int64_t>& row_splits);

// Truncation (with overflowing rows when params.overflow, in the order of HF
// tokenizers' Encoding::merge_with) + special tokens + padding width; throws
// std::invalid_argument with HF's message when a sequence is too short to
// truncate or the stride is not below the truncated length.
void finalize(const EncodeParams& params, EncodedBatch& batch);

// Output buffers, each optional (null), batch.total entries (offsets: 2 per entry),
// rows packed back to back as described by row_offset / width. word_ids and
// sequence_ids (needs params.with_words) are -1 for special and padding tokens.
struct OutputBuffers {
  int64_t* input_ids = nullptr;
  int64_t* attention_mask = nullptr;
  int64_t* token_type_ids = nullptr;
  int64_t* special_tokens_mask = nullptr;
  int64_t* offsets = nullptr;
  int32_t* word_ids = nullptr;
  int8_t* sequence_ids = nullptr;
};
void fill(const EncodeParams& params, const EncodedBatch& batch, OutputBuffers out, ThreadPool* pool);

}  // namespace tok
}  // namespace turbotune
