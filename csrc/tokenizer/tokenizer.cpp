// BERT WordPiece tokenizer core: normalizer + pre-tokenizer + WordPiece fused
// into one pass over the UTF-8 input. See tokenizer.h.
#include "tokenizer/tokenizer.h"

#include <algorithm>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <unordered_set>

#include "tokenizer/unicode_tables.h"

namespace turbotune {
namespace tok {

// ---------------------------------------------------------------- trie
void Trie::build(const std::vector<std::string>& tokens) {
  std::unordered_map<uint64_t, int32_t> edges;
  ids_.assign(1, -1);
  for (int b = 0; b < 256; ++b) root_[b] = -1;
  for (size_t t = 0; t < tokens.size(); ++t) {
    int32_t node = 0;
    for (unsigned char c : tokens[t]) {
      int32_t next;
      if (node == 0) {
        next = root_[c];
        if (next < 0) {
          next = int32_t(ids_.size());
          ids_.push_back(-1);
          root_[c] = next;
        }
      } else {
        uint64_t key = (uint64_t(uint32_t(node)) << 8) | c;
        auto it = edges.find(key);
        if (it == edges.end()) {
          next = int32_t(ids_.size());
          ids_.push_back(-1);
          edges.emplace(key, next);
        } else {
          next = it->second;
        }
      }
      node = next;
    }
    if (node != 0) ids_[size_t(node)] = int32_t(t);
  }
  size_t cap = 16;
  shift_ = 60;
  while (cap < edges.size() * 2 + 16) {
    cap <<= 1;
    --shift_;
  }
  mask_ = cap - 1;
  keys_.assign(cap, kEmpty);
  vals_.assign(cap, -1);
  for (const auto& kv : edges) {
    size_t h = size_t((kv.first * 0x9E3779B97F4A7C15ULL) >> shift_);
    while (keys_[h] != kEmpty) h = (h + 1) & mask_;
    keys_[h] = kv.first;
    vals_[h] = kv.second;
  }
}

int32_t Trie::walk(const std::string& s) const {
  int32_t node = 0;
  for (unsigned char c : s) {
    node = child(node, c);
    if (node < 0) return -1;
  }
  return node;
}

void WordTable::build(const std::vector<std::string>& tokens, const std::string& prefix, bool strip_prefix) {
  size_t n = 0;
  for (const auto& t : tokens) n += !strip_prefix || (!prefix.empty() && t.compare(0, prefix.size(), prefix) == 0);
  size_t cap = 16;
  while (cap < n * 2 + 16) cap <<= 1;
  mask_ = cap - 1;
  slots_.assign(cap, Slot{0, -1, 0, 0, 0});
  pool_.clear();
  for (size_t id = 0; id < tokens.size(); ++id) {
    const std::string& t = tokens[id];
    std::string key;
    if (strip_prefix) {
      if (prefix.empty() || t.compare(0, prefix.size(), prefix) != 0) continue;
      key = t.substr(prefix.size());
    } else {
      key = t;
    }
    if (key.empty() || key.size() > 0xFFFF) continue;
    std::string padded = key + std::string(8, '\0');
    const uint8_t* kp = reinterpret_cast<const uint8_t*>(padded.data());
    if (find(kp, key.size()) >= 0) continue;  // first id wins (duplicates are rejected earlier)
    uint64_t head = 0;
    std::memcpy(&head, kp, std::min<size_t>(8, key.size()));
    const uint64_t h = hash(kp, key.size());
    size_t i = size_t(h >> 20) & mask_;
    while (slots_[i].id >= 0) i = (i + 1) & mask_;
    slots_[i] = Slot{head, int32_t(id), uint32_t(pool_.size()), uint16_t(key.size()), uint16_t(h)};
    pool_ += key;
  }
}

// ---------------------------------------------------------------- utf-8
namespace {

inline uint32_t decode_utf8(const uint8_t*& p, const uint8_t* end) {
  uint32_t c = *p;
  if (c < 0x80) {
    ++p;
    return c;
  }
  int n;
  uint32_t cp, min;
  if ((c & 0xE0) == 0xC0) { n = 1; cp = c & 0x1F; min = 0x80; }
  else if ((c & 0xF0) == 0xE0) { n = 2; cp = c & 0x0F; min = 0x800; }
  else if ((c & 0xF8) == 0xF0) { n = 3; cp = c & 0x07; min = 0x10000; }
  else { ++p; return 0xFFFD; }
  if (end - p <= n) { p = end; return 0xFFFD; }
  for (int i = 1; i <= n; ++i) {
    uint32_t cc = p[i];
    if ((cc & 0xC0) != 0x80) { p += i; return 0xFFFD; }
    cp = (cp << 6) | (cc & 0x3F);
  }
  p += n + 1;
  if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0xFFFD;
  return cp;
}

inline int encode_utf8(uint32_t cp, char* out) {
  if (cp < 0x80) { out[0] = char(cp); return 1; }
  if (cp < 0x800) { out[0] = char(0xC0 | (cp >> 6)); out[1] = char(0x80 | (cp & 0x3F)); return 2; }
  if (cp < 0x10000) {
    out[0] = char(0xE0 | (cp >> 12)); out[1] = char(0x80 | ((cp >> 6) & 0x3F)); out[2] = char(0x80 | (cp & 0x3F));
    return 3;
  }
  out[0] = char(0xF0 | (cp >> 18)); out[1] = char(0x80 | ((cp >> 12) & 0x3F));
  out[2] = char(0x80 | ((cp >> 6) & 0x3F)); out[3] = char(0x80 | (cp & 0x3F));
  return 4;
}

struct Utf8Src {
  using Unit = uint8_t;
  static constexpr bool kUtf8 = true;
  static inline uint32_t next(const Unit*& p, const Unit* end, bool&) { return decode_utf8(p, end); }
};

template <class U>
struct FixedSrc {
  using Unit = U;
  static constexpr bool kUtf8 = false;
  static inline uint32_t next(const Unit*& p, const Unit*, bool& bad) {
    uint32_t c = *p++;
    if (sizeof(U) > 1 && ((c >= 0xD800 && c <= 0xDFFF) || c > 0x10FFFF)) {
      bad = true;
      return 0xFFFD;
    }
    return c;
  }
};

std::vector<uint32_t> to_cps(const std::string& s) {
  std::vector<uint32_t> out;
  const uint8_t* p = reinterpret_cast<const uint8_t*>(s.data());
  const uint8_t* end = p + s.size();
  while (p < end) out.push_back(decode_utf8(p, end));
  return out;
}

int32_t count_chars(const std::string& s) {
  int32_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

}  // namespace

// ---------------------------------------------------------------- tokenizer
Tokenizer::Tokenizer(std::vector<std::string> vocab, Options options, std::vector<std::string> special_tokens)
    : vocab_(std::move(vocab)), options_(std::move(options)) {
  if (vocab_.empty()) throw std::invalid_argument("vocab: expected at least one token, got an empty vocabulary");
  std::unordered_map<std::string, int32_t> seen;
  seen.reserve(vocab_.size() * 2);
  for (size_t i = 0; i < vocab_.size(); ++i) {
    auto r = seen.emplace(vocab_[i], int32_t(i));
    if (!r.second)
      throw std::invalid_argument("vocab: duplicate token '" + vocab_[i] + "' at ids " +
                                  std::to_string(r.first->second) + " and " + std::to_string(i) +
                                  " (each token must appear once)");
  }
  auto unk = seen.find(options_.unk_token);
  if (unk == seen.end())
    throw std::invalid_argument("vocab: the unknown token '" + options_.unk_token +
                                "' is not in the vocabulary (WordPiece needs it for unmatchable words)");
  unk_id_ = unk->second;
  if (options_.max_input_chars_per_word < 0)
    throw std::invalid_argument("max_input_chars_per_word: expected >= 0");
  trie_.build(vocab_);
  whole_.build(vocab_, options_.continuing_subword_prefix, false);
  cont_whole_.build(vocab_, options_.continuing_subword_prefix, true);
  cont_root_ = options_.continuing_subword_prefix.empty() ? 0 : trie_.walk(options_.continuing_subword_prefix);

  for (auto& b : special_first_byte_) b = false;
  std::unordered_set<std::string> uniq;
  for (auto& s : special_tokens) {
    if (s.empty() || !uniq.insert(s).second) continue;
    auto it = seen.find(s);
    if (it == seen.end())
      throw std::invalid_argument("special_tokens: '" + s + "' is not in the vocabulary");
    specials_.push_back({s, to_cps(s), it->second, count_chars(s)});
    special_first_byte_[(unsigned char)s[0]] = true;
    if ((unsigned char)s[0] >= 0x80) special_non_ascii_start_ = true;
  }
  std::stable_sort(specials_.begin(), specials_.end(),
                   [](const Special& x, const Special& y) { return x.text.size() > y.text.size(); });

  for (int c = 0; c < 128; ++c) {
    uint8_t f = unicode_flags(uint32_t(c));
    uint8_t act;
    if (options_.clean_text && (f & kRemove)) act = 3;
    else if (options_.clean_text && (f & kCleanWs)) act = 1;
    else if (options_.handle_chinese_chars && (f & kCjk)) act = 4;
    else if (options_.strip_accents && (f & (kHasNfd | kMark))) act = 4;
    else {
      uint32_t m = uint32_t(c);
      if (options_.lowercase && (f & kHasLower)) {
        const MapEntry* e = find_mapping(kLowerMap, kLowerMapSize, m);
        if (!e || e->len != 1 || kLowerPool[e->offset] >= 128) { ascii_action_[c] = 4; ascii_map_[c] = 0; continue; }
        m = kLowerPool[e->offset];
      }
      uint8_t g = unicode_flags(m);
      act = (g & kPreWs) ? 1 : (g & kPrePunct) ? 2 : 0;
      ascii_map_[c] = char(m);
    }
    ascii_action_[c] = act;
  }
  for (int c = 0; c < 128; ++c) ascii_plain_[c] = ascii_action_[c] == 0 && !special_first_byte_[c];
}

inline void Tokenizer::push_cp(Scratch& s, uint32_t cp, int32_t start, int32_t end) const {
  char buf[4];
  int n = encode_utf8(cp, buf);
  s.reserve(4);
  for (int i = 0; i < n; ++i) s.put(uint8_t(buf[i]), start, end);
  ++s.nchars;
}

// Lowercase one character, then let the pre-tokenizer classify each result.
inline void Tokenizer::lower_classify(Scratch& s, Sink out, uint32_t c, int32_t start, int32_t end) const {
  const uint32_t* lseq = &c;
  uint32_t nl = 1;
  if (options_.lowercase && (unicode_flags(c) & kHasLower)) {
    const MapEntry* e = find_mapping(kLowerMap, kLowerMapSize, c);
    if (e) {
      lseq = kLowerPool + e->offset;
      nl = e->len;
    }
  }
  for (uint32_t j = 0; j < nl; ++j) {
    uint32_t d = lseq[j];
    uint8_t g = unicode_flags(d);
    if (g & kPreWs) {
      flush_word(s, out);
    } else if (g & kPrePunct) {
      flush_word(s, out);
      push_cp(s, d, start, end);
      flush_word(s, out);
    } else {
      push_cp(s, d, start, end);
    }
  }
}

// strip_accents for one character of the NFD decomposition.
inline void Tokenizer::strip_char(Scratch& s, Sink out, uint32_t d, bool inserted, int32_t start,
                                  int32_t end) const {
  if (unicode_flags(d) & kMark) {
    const MarkEntry* m = find_mark(d);
    if (m && m->ccc) {
      if (s.run.empty()) {
        if (inserted) {
          s.run_prev_start = start;
          s.run_prev_end = end;
        } else {
          s.run_prev_start = s.last_start;
          s.run_prev_end = s.last_end;
        }
      }
      s.run.push_back({d, m->ccc, m->mn, uint8_t(inserted), start, end});
      return;
    }
    if (!s.run.empty()) flush_run(s, out);
    if (m && m->mn) return;
  } else if (!s.run.empty()) {
    flush_run(s, out);
  }
  lower_classify(s, out, d, start, end);
}

void Tokenizer::flush_run(Scratch& s, Sink out) const {
  bool survivor = false;
  for (const auto& r : s.run) survivor |= !r.mn;
  if (survivor) {
    s.sorted_run = s.run;
    std::stable_sort(s.sorted_run.begin(), s.sorted_run.end(),
                     [](const Scratch::RunChar& x, const Scratch::RunChar& y) { return x.ccc < y.ccc; });
    // Consumed sources in their original order; inserted characters take the
    // alignment of the source consumed before them.
    size_t next_src = 0;
    int32_t ps = s.run_prev_start, pe = s.run_prev_end;
    for (size_t p = 0; p < s.sorted_run.size(); ++p) {
      const Scratch::RunChar& e = s.sorted_run[p];
      if (!e.inserted) {
        while (next_src < s.run.size() && s.run[next_src].inserted) ++next_src;
        ps = s.run[next_src].start;
        pe = s.run[next_src].end;
        ++next_src;
      }
      if (!e.mn) lower_classify(s, out, e.cp, ps, pe);
    }
  }
  s.run.clear();
}

// One character after clean_text / CJK handling: strip accents (NFD, drop Mn),
// lowercase, then let the pre-tokenizer classify each resulting character.
inline void Tokenizer::emit_normalized(Scratch& s, Sink out, uint32_t cp, int32_t start, int32_t end) const {
  if (!options_.strip_accents) {
    lower_classify(s, out, cp, start, end);
    return;
  }
  if (unicode_flags(cp) & kHasNfd) {
    const MapEntry* e = find_mapping(kNfdMap, kNfdMapSize, cp);
    if (e) {
      for (uint32_t i = 0; i < e->len; ++i) strip_char(s, out, kNfdPool[e->offset + i], i > 0, start, end);
      return;
    }
  }
  strip_char(s, out, cp, false, start, end);
}

template <class Unit>
size_t Tokenizer::match_special(const Unit* p, size_t left, bool utf8, int32_t* id, int32_t* nchars) const {
  for (const Special& sp : specials_) {
    if (utf8) {
      if (sp.text.size() <= left && std::memcmp(p, sp.text.data(), sp.text.size()) == 0) {
        *id = sp.id;
        *nchars = sp.nchars;
        return sp.text.size();
      }
    } else if (sp.cps.size() <= left) {
      size_t k = 0;
      while (k < sp.cps.size() && uint32_t(p[k]) == sp.cps[k]) ++k;
      if (k == sp.cps.size()) {
        *id = sp.id;
        *nchars = sp.nchars;
        return k;
      }
    }
  }
  return 0;
}

// WordPiece on the buffered word: greedy longest match. Each piece first asks
// the whole-token table whether the rest of the word is one token, else walks
// the trie once from the piece start (the last token node seen is the match).
void Tokenizer::flush_word(Scratch& s, Sink out) const {
  const size_t n = s.wn;
  if (n == 0) return;
  std::vector<int32_t>& ids = *out.ids;
  std::vector<int32_t>* offs = out.offsets;
  const size_t mark = ids.size();
  bool ok = s.nchars <= options_.max_input_chars_per_word;
  if (ok) {
    const uint8_t* w = s.word.data();
    size_t pos = 0;
    while (pos < n) {
      int32_t best = (pos == 0 ? whole_ : cont_whole_).find(w + pos, n - pos);
      size_t best_end = n;
      if (best < 0) {
        int32_t node = pos == 0 ? 0 : cont_root_;
        if (node < 0) { ok = false; break; }
        for (size_t p = pos; p < n;) {
          node = trie_.child(node, w[p]);
          if (node < 0) break;
          ++p;
          int32_t t = trie_.token(node);
          if (t >= 0) {
            best = t;
            best_end = p;
          }
        }
        if (best < 0) { ok = false; break; }
      }
      ids.push_back(best);
      if (offs) {
        offs->push_back(s.bstart[pos]);
        offs->push_back(s.bend[best_end - 1]);
      }
      pos = best_end;
    }
  }
  if (!ok) {
    ids.resize(mark);
    ids.push_back(unk_id_);
    if (offs) {
      offs->resize(mark * 2);
      offs->push_back(s.bstart[0]);
      offs->push_back(s.bend[n - 1]);
    }
  }
  if (s.words) s.words->insert(s.words->end(), ids.size() - mark, s.word_index++);
  s.wn = 0;
  s.nchars = 0;
}

bool Tokenizer::encode(const TextView& t, Scratch& s, Sink out) const {
  switch (t.kind) {
    case 0: {
      auto p = static_cast<const uint8_t*>(t.data);
      return encode_impl<Utf8Src>(p, p + t.len, s, out);
    }
    case 1: {
      auto p = static_cast<const uint8_t*>(t.data);
      return encode_impl<FixedSrc<uint8_t>>(p, p + t.len, s, out);
    }
    case 2: {
      auto p = static_cast<const uint16_t*>(t.data);
      return encode_impl<FixedSrc<uint16_t>>(p, p + t.len, s, out);
    }
    case 4: {
      auto p = static_cast<const uint32_t*>(t.data);
      return encode_impl<FixedSrc<uint32_t>>(p, p + t.len, s, out);
    }
    default:
      throw std::invalid_argument("text kind: expected 0 (UTF-8), 1, 2 or 4");
  }
}

template <class Src>
bool Tokenizer::encode_impl(const typename Src::Unit* p, const typename Src::Unit* end, Scratch& s,
                            Sink out) const {
  using Unit = typename Src::Unit;
  bool bad = false;
  s.wn = 0;
  s.nchars = 0;
  s.word_index = 0;
  s.run.clear();
  s.track = out.offsets != nullptr;
  if (s.track && s.bstart.size() < s.cap()) {
    s.bstart.resize(s.cap());
    s.bend.resize(s.cap());
  }
  s.last_start = s.last_end = 0;
  int32_t ci = 0;  // index of the current code point in the original string
  const bool clean = options_.clean_text, chinese = options_.handle_chinese_chars;
  const bool have_specials = !specials_.empty();
  while (p < end) {
    const uint32_t c = *p;
    if (have_specials && ((c < 0x80 && special_first_byte_[c]) ||
                          (c >= 0x80 && (Src::kUtf8 ? special_first_byte_[c & 0xFF] : special_non_ascii_start_)))) {
      int32_t id, nch;
      size_t m = match_special(p, size_t(end - p), Src::kUtf8, &id, &nch);
      if (m) {
        if (!s.run.empty()) flush_run(s, out);
        flush_word(s, out);
        out.ids->push_back(id);
        if (out.offsets) {
          out.offsets->push_back(ci);
          out.offsets->push_back(ci + nch);
        }
        if (s.words) s.words->push_back(s.word_index++);
        p += m;
        ci += nch;
        s.last_start = s.last_end = ci;
        continue;
      }
    }
    if (c < 0x80) {
      if (!s.run.empty() && ascii_action_[c] != 3) flush_run(s, out);
      switch (ascii_action_[c]) {
        case 0: {
          // A run of plain ASCII word characters, copied (lowercased) with local
          // pointers: byte stores alias everything, so no member is touched in the loop.
          const Unit* q = p;
          for (;;) {
            s.reserve(64);
            const Unit* stop = std::min(end, q + 64);
            uint8_t* wp = s.word.data() + s.wn;
            const Unit* q0 = q;
            if (!s.track) {
              while (q < stop) {
                const uint32_t d = *q;
                if (d >= 0x80 || !ascii_plain_[d]) break;
                *wp++ = uint8_t(ascii_map_[d]);
                ++q;
              }
            } else {
              int32_t* bs = s.bstart.data() + s.wn;
              int32_t* be = s.bend.data() + s.wn;
              int32_t cc = ci;
              while (q < stop) {
                const uint32_t d = *q;
                if (d >= 0x80 || !ascii_plain_[d]) break;
                *wp++ = uint8_t(ascii_map_[d]);
                *bs++ = cc;
                *be++ = ++cc;
                ++q;
              }
            }
            s.wn += size_t(q - q0);
            ci += int32_t(q - q0);
            if (q < stop || q == end) break;
          }
          s.nchars += int32_t(q - p);
          s.last_start = ci - 1;
          s.last_end = ci;
          p = q;
          continue;
        }
        case 1:
          flush_word(s, out);
          break;
        case 2:
          flush_word(s, out);
          s.reserve(1);
          s.put(uint8_t(ascii_map_[c]), ci, ci + 1);
          s.nchars = 1;
          flush_word(s, out);
          break;
        case 3:
          break;
        default:
          emit_normalized(s, out, c, ci, ci + 1);
      }
      if (ascii_action_[c] != 3) {
        s.last_start = ci;
        s.last_end = ci + 1;
      }
      ++p;
      ++ci;
      continue;
    }
    const uint32_t cp = Src::next(p, end, bad);
    const uint8_t f = unicode_flags(cp);
    if (clean && (f & kRemove)) {
    } else if (clean && (f & kCleanWs)) {
      if (!s.run.empty()) flush_run(s, out);
      flush_word(s, out);
    } else if (chinese && (f & kCjk)) {
      if (!s.run.empty()) flush_run(s, out);
      flush_word(s, out);
      emit_normalized(s, out, cp, ci, ci + 1);
      flush_word(s, out);
    } else {
      emit_normalized(s, out, cp, ci, ci + 1);
    }
    if (!(clean && (f & kRemove))) {
      s.last_start = ci;
      s.last_end = ci + 1;
    }
    ++ci;
  }
  if (!s.run.empty()) flush_run(s, out);
  flush_word(s, out);
  return !bad;
}

// ---------------------------------------------------------------- thread pool
ThreadPool::ThreadPool(int threads) {
  for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { worker_loop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::worker_loop() {
  uint64_t seen = 0;
  for (;;) {
    const std::function<void(int)>* fn;
    int n;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      fn = fn_;
      n = ntasks_;
      ++active_;
    }
    int done = 0;
    for (int i; (i = next_.fetch_add(1)) < n;) {
      (*fn)(i);
      ++done;
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      finished_ += done;
      --active_;
    }
    done_cv_.notify_all();
  }
}

void ThreadPool::run(int ntasks, const std::function<void(int)>& fn) {
  if (ntasks <= 0) return;
  if (workers_.empty() || ntasks == 1) {
    for (int i = 0; i < ntasks; ++i) fn(i);
    return;
  }
  std::lock_guard<std::mutex> run_lock(run_mu_);
  {
    std::lock_guard<std::mutex> lk(mu_);
    fn_ = &fn;
    ntasks_ = ntasks;
    next_.store(0);
    finished_ = 0;
    ++generation_;
  }
  cv_.notify_all();
  int done = 0;
  for (int i; (i = next_.fetch_add(1)) < ntasks;) {
    fn(i);
    ++done;
  }
  std::unique_lock<std::mutex> lk(mu_);
  finished_ += done;
  done_cv_.wait(lk, [&] { return finished_ == ntasks_ && active_ == 0; });
  fn_ = nullptr;
}

// ---------------------------------------------------------------- batches
namespace {
inline size_t view_bytes(const TextView& t) { return t.kind == 0 ? t.len : t.len * t.kind; }
constexpr size_t kTasksPerThread = 32;
// Task boundaries for ntasks tasks of about equal cost (input units plus a small
// per-text cost): a corpus mixes cheap and expensive stretches (ASCII prose,
// CJK, accented text), so equal counts of texts can differ several-fold in
// work, and the thread that draws the last heavy task finishes alone.
template <class RowBytes>
std::vector<size_t> balanced_bounds(size_t n, const RowBytes& cost, size_t total_bytes, int ntasks) {
  constexpr size_t kPerText = 16;
  const size_t total = total_bytes + kPerText * n;
  std::vector<size_t> bounds(static_cast<size_t>(ntasks) + 1, n);
  bounds[0] = 0;
  size_t acc = 0, t = 1;
  for (size_t i = 0; i < n && t < size_t(ntasks); ++i) {
    acc += cost(i) + kPerText;
    while (t < size_t(ntasks) && acc * size_t(ntasks) >= total * t) bounds[t++] = i + 1;
  }
  return bounds;
}
// Input bytes of row i of a side.
inline size_t row_bytes(const TextBatch& side, size_t i) {
  if (side.splits.empty()) return view_bytes(side.views[i]);
  size_t b = 0;
  for (int64_t j = side.splits[i]; j < side.splits[i + 1]; ++j) b += view_bytes(side.views[size_t(j)]);
  return b;
}
inline void note_bad(std::atomic<int64_t>& slot, int64_t i) {
  int64_t cur = slot.load();
  while ((cur < 0 || i < cur) && !slot.compare_exchange_weak(cur, i)) {
  }
}
}  // namespace

// Encodes row i of side into sink; false when it holds a lone surrogate.
// Pre-split words are encoded one by one, each with its own offsets and the
// word's index in the row as word id.
static bool encode_row(const Tokenizer& tok, const TextBatch& side, size_t i, Scratch& s, Sink sink,
                       std::vector<int32_t>* words) {
  if (side.splits.empty()) {
    s.words = words;
    return tok.encode(side.views[i], s, sink);
  }
  s.words = nullptr;
  bool ok = true;
  const int64_t first = side.splits[i];
  for (int64_t j = first; j < side.splits[i + 1]; ++j) {
    const size_t before = sink.ids->size();
    ok &= tok.encode(side.views[size_t(j)], s, sink);
    if (words) words->insert(words->end(), sink.ids->size() - before, int32_t(j - first));
  }
  return ok;
}

void encode_batch(const Tokenizer& tok, const TextBatch& texts, const TextBatch* pairs, const EncodeParams& params,
                  ThreadPool* pool, EncodedBatch& out) {
  const size_t n = texts.rows();
  out.has_pair = pairs != nullptr;
  out.a.assign(n, {0, 0, 0});
  out.b.assign(pairs ? n : 0, {0, 0, 0});
  size_t bytes = 0;
  for (auto& t : texts.views) bytes += view_bytes(t);
  if (pairs)
    for (auto& t : pairs->views) bytes += view_bytes(t);
  std::atomic<int64_t> bad_text{-1}, bad_pair{-1};
  int threads = std::max(1, params.num_threads);
  if (!pool) threads = 1;
  threads = std::min(threads, pool ? pool->threads() : 1);
  // Below ~16 KB a thread hand-off costs more than it saves.
  if (bytes < 16384) threads = 1;
  // Many small tasks of equal cost, drawn dynamically: the threads finish together.
  int ntasks = threads == 1 ? 1 : int(std::min<size_t>(n, size_t(threads) * kTasksPerThread));
  if (ntasks < 1) ntasks = 1;
  auto cost = [&](size_t i) { return row_bytes(texts, i) + (pairs ? row_bytes(*pairs, i) : 0); };
  const std::vector<size_t> bounds =
      ntasks == 1 ? std::vector<size_t>{0, n} : balanced_bounds(n, cost, bytes, ntasks);
  out.chunks.resize(size_t(ntasks));
  auto task = [&](int t) {
    const size_t lo = bounds[size_t(t)], hi = bounds[size_t(t) + 1];
    // Filled in a local Chunk and moved into place at the end: the chunks'
    // vector headers sit side by side in out.chunks, and every append writes
    // the header's end pointer, so threads running neighbouring tasks would
    // fight over the same cache line for each token (false sharing).
    EncodedBatch::Chunk ch = std::move(out.chunks[size_t(t)]);
    ch.ids.clear();
    ch.offsets.clear();
    ch.words.clear();
    size_t cb = 0;
    if (ntasks == 1) cb = bytes;
    else for (size_t i = lo; i < hi; ++i) cb += cost(i);
    // Upper estimate (about one token per input unit): growing would copy the
    // buffer and fault its pages again; untouched reserved pages cost nothing.
    const size_t est = cb + 2 * (hi - lo) + 16;
    ch.ids.reserve(est);
    if (params.with_offsets) ch.offsets.reserve(est * 2);
    if (params.with_words) ch.words.reserve(est);
    static thread_local Scratch s;
    Sink sink{&ch.ids, params.with_offsets ? &ch.offsets : nullptr};
    std::vector<int32_t>* words = params.with_words ? &ch.words : nullptr;
    for (size_t i = lo; i < hi; ++i) {
      uint32_t b0 = uint32_t(ch.ids.size());
      if (!encode_row(tok, texts, i, s, sink, words)) note_bad(bad_text, int64_t(i));
      out.a[i] = {t, b0, uint32_t(ch.ids.size()) - b0};
      if (pairs) {
        b0 = uint32_t(ch.ids.size());
        if (!encode_row(tok, *pairs, i, s, sink, words)) note_bad(bad_pair, int64_t(i));
        out.b[i] = {t, b0, uint32_t(ch.ids.size()) - b0};
      }
    }
    s.words = nullptr;
    out.chunks[size_t(t)] = std::move(ch);
  };
  if (ntasks == 1) task(0);
  else pool->run(ntasks, task);
  out.bad_text = bad_text.load();
  out.bad_pair = bad_pair.load();
}

namespace {
// Recycled per-task buffers of encode_ragged. Only what was written stays
// resident (the rest of each reservation is never touched), and a workspace
// that held more than kKeepIds tokens is freed instead of kept.
struct RaggedParts {
  std::vector<std::vector<int32_t>> parts;
};
constexpr size_t kKeepIds = size_t(32) << 20;  // 128 MB of int32
std::mutex g_parts_mu;
std::vector<std::unique_ptr<RaggedParts>> g_parts;  // free workspaces (one per concurrent call at most)

std::unique_ptr<RaggedParts> take_parts() {
  std::lock_guard<std::mutex> lk(g_parts_mu);
  if (g_parts.empty()) return std::make_unique<RaggedParts>();
  std::unique_ptr<RaggedParts> w = std::move(g_parts.back());
  g_parts.pop_back();
  return w;
}

void give_back_parts(std::unique_ptr<RaggedParts> w, size_t ids_written) {
  if (ids_written > kKeepIds) return;  // a huge batch: do not hold its memory
  std::lock_guard<std::mutex> lk(g_parts_mu);
  if (g_parts.size() < 4) g_parts.push_back(std::move(w));
}
}  // namespace

int64_t encode_ragged(const Tokenizer& tok, const std::vector<TextView>& texts, int32_t cls_id, int32_t sep_id,
                      int num_threads, ThreadPool* pool, RaggedIds& ids, std::vector<int64_t>& row_splits) {
  const size_t n = texts.size();
  size_t bytes = 0;
  for (auto& t : texts) bytes += view_bytes(t);
  std::atomic<int64_t> bad{-1};
  int threads = pool ? std::min(std::max(1, num_threads), pool->threads()) : 1;
  if (bytes < 16384) threads = 1;
  const int ntasks = threads == 1 ? 1 : int(std::min<size_t>(n, size_t(threads) * kTasksPerThread));
  row_splits.assign(n + 1, 0);
  auto run_range = [&](size_t lo, size_t hi, std::vector<int32_t>& out) {
    static thread_local Scratch s;
    Sink sink{&out, nullptr};
    for (size_t i = lo; i < hi; ++i) {
      const size_t b0 = out.size();
      if (cls_id >= 0) out.push_back(cls_id);
      if (!tok.encode(texts[i], s, sink)) note_bad(bad, int64_t(i));
      if (sep_id >= 0) out.push_back(sep_id);
      row_splits[i + 1] = int64_t(out.size() - b0);  // length for now
    }
  };
  if (ntasks <= 1) {
    ids.raw.reset();
    ids.vec.clear();
    ids.vec.reserve(bytes + 2 * n + 16);
    run_range(0, n, ids.vec);
  } else {
    const std::vector<size_t> bounds =
        balanced_bounds(n, [&](size_t i) { return view_bytes(texts[i]); }, bytes, ntasks);
    // The per-task buffers are recycled from call to call: fresh ones had
    // their pages faulted in again on every call (twice the page faults of the
    // one-thread path, which writes straight into the result).
    std::unique_ptr<RaggedParts> ws = take_parts();
    std::vector<std::vector<int32_t>>& parts = ws->parts;
    if (parts.size() < size_t(ntasks)) parts.resize(size_t(ntasks));
    pool->run(ntasks, [&](int t) {
      const size_t lo = bounds[size_t(t)], hi = bounds[size_t(t) + 1];
      size_t cb = 0;
      for (size_t i = lo; i < hi; ++i) cb += view_bytes(texts[i]);
      // A local vector, moved back at the end: the headers in `parts` share
      // cache lines, and each append writes the end pointer (false sharing
      // between threads running neighbouring tasks).
      std::vector<int32_t> part = std::move(parts[size_t(t)]);
      part.clear();
      const size_t need = cb + 2 * (hi - lo) + 16;
      if (part.capacity() < need) {
        std::vector<int32_t>().swap(part);
        part.reserve(need + need / 4);
      }
      run_range(lo, hi, part);
      parts[size_t(t)] = std::move(part);
    });
    size_t total = 0;
    std::vector<size_t> at(static_cast<size_t>(ntasks));
    for (int t = 0; t < ntasks; ++t) {
      at[size_t(t)] = total;
      total += parts[size_t(t)].size();
    }
    ids.vec.clear();
    ids.raw.reset(new int32_t[total > 0 ? total : 1]);
    ids.raw_size = total;
    int32_t* dst = ids.raw.get();
    pool->run(ntasks, [&](int t) {
      auto& src = parts[size_t(t)];
      if (!src.empty()) std::memcpy(dst + at[size_t(t)], src.data(), src.size() * sizeof(int32_t));
    });
    give_back_parts(std::move(ws), total);
  }
  for (size_t i = 0; i < n; ++i) row_splits[i + 1] += row_splits[i];
  return bad.load();
}

namespace {
// The token windows HF tokenizers' Encoding::truncate(max_len, stride, direction)
// keeps of a sequence of len tokens: the first is the truncated sequence, the
// others (only with overflow) its overflowing parts, `stride` tokens overlapping.
void windows(int64_t len, int64_t max_len, int64_t stride, bool left, bool overflow,
             std::vector<std::pair<uint32_t, uint32_t>>& out) {
  out.clear();
  if (max_len >= len) {
    out.emplace_back(0, uint32_t(len));
    return;
  }
  if (max_len == 0) {  // everything overflows
    out.emplace_back(0, 0);
    if (overflow) out.emplace_back(0, uint32_t(len));
    return;
  }
  if (stride >= max_len)
    throw std::invalid_argument("stride: `stride` must be strictly less than `max_len=" + std::to_string(max_len) +
                                "` (note that `max_len` may be shorter than the max length of the original model, "
                                "as it subtracts the number of special characters)");
  if (!overflow) {
    out.emplace_back(left ? uint32_t(len - max_len) : 0, uint32_t(max_len));
    return;
  }
  const int64_t step = max_len - stride;
  if (!left) {
    for (int64_t start = 0; start < len; start += step) {
      const int64_t stop = std::min(start + max_len, len);
      out.emplace_back(uint32_t(start), uint32_t(stop - start));
      if (stop == len) break;
    }
  } else {
    for (int64_t last = len - 1; last >= 0; last -= step) {
      const int64_t stop = last + 1, start = std::max<int64_t>(0, stop - max_len);
      out.emplace_back(uint32_t(start), uint32_t(stop - start));
      if (start == 0) break;
    }
  }
}
}  // namespace

void finalize(const EncodeParams& params, EncodedBatch& batch) {
  const size_t n = batch.a.size();
  const bool pair = batch.has_pair;
  const int64_t added = params.add_special_tokens ? (pair ? 3 : 2) : 0;
  batch.rows.clear();
  batch.rows.reserve(n);
  batch.length.clear();
  batch.length.reserve(n);
  const bool truncate = params.truncation != Truncation::kNone && params.max_length >= 0;
  if (truncate && params.max_length < added)
    throw std::invalid_argument("max_length: " + std::to_string(params.max_length) + " is shorter than the " +
                                std::to_string(added) + " special tokens that must be added");
  if (params.stride < 0) throw std::invalid_argument("stride: expected >= 0");
  const int64_t limit = params.max_length - added;
  const bool left = params.truncate_left;
  int64_t longest = 0;
  std::vector<std::pair<uint32_t, uint32_t>> wa, wb;
  for (size_t i = 0; i < n; ++i) {
    const int64_t len1 = batch.a[i].len, len2 = pair ? batch.b[i].len : 0;
    int64_t n1 = len1, n2 = len2;  // truncated lengths (as HF tokenizers' truncate_encodings)
    if (truncate) {
      if (limit == 0) {
        n1 = 0;
        n2 = 0;
      } else if (n1 + n2 > limit) {
        const int64_t to_remove = n1 + n2 - limit;
        if (params.truncation == Truncation::kLongestFirst) {
          if (pair) {
            int64_t s1 = n1, s2 = n2;
            bool swap = false;
            if (s1 > s2) { std::swap(s1, s2); swap = true; }
            if (s1 > limit) s2 = s1;
            else s2 = std::max(s1, limit - s1);
            if (s1 + s2 > limit) {
              s1 = limit / 2;
              s2 = s1 + limit % 2;
            }
            if (swap) std::swap(s1, s2);
            n1 = s1;
            n2 = s2;
          } else {
            n1 = limit;
          }
        } else {
          if (params.truncation == Truncation::kOnlySecond && !pair)
            throw std::invalid_argument("Truncation error: Second sequence not provided (row " + std::to_string(i) +
                                        " is too long and truncation='only_second' needs a text pair)");
          int64_t& target = params.truncation == Truncation::kOnlyFirst ? n1 : n2;
          if (target > to_remove) {
            target -= to_remove;
          } else {
            throw std::invalid_argument(
                "Truncation error: Sequence to truncate too short to respect the provided max_length (row " +
                std::to_string(i) + ")");
          }
        }
      }
    }
    if (!params.overflow && n1 >= len1 && n2 >= len2) {  // the common case: nothing cut
      batch.rows.push_back({int64_t(i), 0, uint32_t(len1), 0, uint32_t(len2)});
      batch.length.push_back(int32_t(len1 + len2 + added));
      longest = std::max<int64_t>(longest, len1 + len2 + added);
      continue;
    }
    windows(len1, n1, params.stride, left, params.overflow, wa);
    if (pair) windows(len2, n2, params.stride, left, params.overflow, wb);
    else wb.assign(1, {0, 0});
    // Rows in the order of Encoding::merge_with: (A0, B0), then each overflowing
    // part of A with B0 and with each overflowing part of B, then A0 with the
    // overflowing parts of B.
    auto add = [&](size_t x, size_t y) {
      batch.rows.push_back({int64_t(i), wa[x].first, wa[x].second, wb[y].first, wb[y].second});
      batch.length.push_back(int32_t(wa[x].second + wb[y].second + added));
    };
    add(0, 0);
    longest = std::max<int64_t>(longest, batch.length.back());  // padding follows the first rows only
    for (size_t x = 1; x < wa.size(); ++x)
      for (size_t y = 0; y < wb.size(); ++y) add(x, y);
    for (size_t y = 1; y < wb.size(); ++y) add(0, y);
  }
  int64_t target = 0;
  if (params.padding == Padding::kLongest) target = longest;
  else if (params.padding == Padding::kMaxLength) target = params.max_length >= 0 ? params.max_length : longest;
  if (params.padding != Padding::kNone && params.pad_to_multiple_of > 0 && target % params.pad_to_multiple_of != 0)
    target += params.pad_to_multiple_of - target % params.pad_to_multiple_of;
  const size_t m = batch.rows.size();
  batch.row_offset.resize(m);
  batch.width.resize(m);
  int64_t total = 0;
  batch.uniform = true;
  constexpr int64_t kMaxTotal = int64_t(1) << 40;  // tokens in one output batch (8 TB per int64 output)
  for (size_t r = 0; r < m; ++r) {
    int64_t w = std::max<int64_t>(batch.length[r], target);
    if (w > kMaxTotal - total)
      throw std::length_error("padding: the padded batch would exceed 2^40 tokens (" + std::to_string(m) +
                              " rows of up to " + std::to_string(w) + " tokens); lower max_length");
    batch.row_offset[r] = total;
    batch.width[r] = w;
    total += w;
    if (w != batch.width[0]) batch.uniform = false;
  }
  batch.total = total;
}

void fill(const EncodeParams& params, const EncodedBatch& batch, OutputBuffers o, ThreadPool* pool) {
  const size_t m = batch.rows.size();
  const bool special = params.add_special_tokens;
  auto row = [&](size_t r) {
    const EncodedBatch::Row& rw = batch.rows[r];
    const int64_t base = batch.row_offset[r], w = batch.width[r], len = batch.length[r];
    const int64_t pad = w - len;
    int64_t pos = params.pad_left ? base + pad : base;
    const int64_t pad_at = params.pad_left ? base : base + len;
    auto put = [&](int32_t id, int32_t type) {
      if (o.input_ids) o.input_ids[pos] = id;
      if (o.attention_mask) o.attention_mask[pos] = 1;
      if (o.token_type_ids) o.token_type_ids[pos] = type;
      if (o.special_tokens_mask) o.special_tokens_mask[pos] = 1;
      if (o.offsets) {
        o.offsets[2 * pos] = 0;
        o.offsets[2 * pos + 1] = 0;
      }
      if (o.word_ids) o.word_ids[pos] = -1;
      if (o.sequence_ids) o.sequence_ids[pos] = -1;
      ++pos;
    };
    auto seq = [&](const EncodedBatch::Span& sp, uint32_t at, uint32_t keep, int32_t type) {
      const EncodedBatch::Chunk& ch = batch.chunks[size_t(sp.chunk)];
      const uint32_t first = sp.begin + at;
      const int32_t* ids = ch.ids.data() + first;
      if (o.input_ids) {
        int64_t* dst = o.input_ids + pos;
        for (uint32_t k = 0; k < keep; ++k) dst[k] = ids[k];
      }
      if (o.attention_mask) std::fill(o.attention_mask + pos, o.attention_mask + pos + keep, int64_t(1));
      if (o.token_type_ids) std::fill(o.token_type_ids + pos, o.token_type_ids + pos + keep, int64_t(type));
      if (o.special_tokens_mask) std::fill(o.special_tokens_mask + pos, o.special_tokens_mask + pos + keep, int64_t(0));
      if (o.offsets) {
        const int32_t* offs = params.with_offsets ? ch.offsets.data() + 2 * size_t(first) : nullptr;
        int64_t* dst = o.offsets + 2 * pos;
        for (uint32_t k = 0; k < 2 * keep; ++k) dst[k] = offs ? offs[k] : 0;
      }
      if (o.word_ids) {
        const int32_t* words = params.with_words ? ch.words.data() + first : nullptr;
        for (uint32_t k = 0; k < keep; ++k) o.word_ids[pos + k] = words ? words[k] : -1;
      }
      if (o.sequence_ids) std::fill(o.sequence_ids + pos, o.sequence_ids + pos + keep, int8_t(type));
      pos += keep;
    };
    if (special) put(params.cls_id, 0);
    seq(batch.a[size_t(rw.src)], rw.a_first, rw.a_len, 0);
    if (special) put(params.sep_id, 0);
    if (batch.has_pair) {
      seq(batch.b[size_t(rw.src)], rw.b_first, rw.b_len, 1);
      if (special) put(params.sep_id, 1);
    }
    if (pad > 0) {
      if (o.input_ids) std::fill(o.input_ids + pad_at, o.input_ids + pad_at + pad, int64_t(params.pad_id));
      if (o.attention_mask) std::fill(o.attention_mask + pad_at, o.attention_mask + pad_at + pad, int64_t(0));
      if (o.token_type_ids)
        std::fill(o.token_type_ids + pad_at, o.token_type_ids + pad_at + pad, int64_t(params.pad_type_id));
      if (o.special_tokens_mask)
        std::fill(o.special_tokens_mask + pad_at, o.special_tokens_mask + pad_at + pad, int64_t(1));
      if (o.offsets) std::fill(o.offsets + 2 * pad_at, o.offsets + 2 * (pad_at + pad), int64_t(0));
      if (o.word_ids) std::fill(o.word_ids + pad_at, o.word_ids + pad_at + pad, int32_t(-1));
      if (o.sequence_ids) std::fill(o.sequence_ids + pad_at, o.sequence_ids + pad_at + pad, int8_t(-1));
    }
  };
  int threads = pool ? std::min(std::max(1, params.num_threads), pool->threads()) : 1;
  if (batch.total < (1 << 16)) threads = 1;
  if (threads == 1) {
    for (size_t r = 0; r < m; ++r) row(r);
    return;
  }
  const int ntasks = int(std::min<size_t>(m, size_t(threads) * 4));
  pool->run(ntasks, [&](int t) {
    size_t lo = m * size_t(t) / size_t(ntasks), hi = m * size_t(t + 1) / size_t(ntasks);
    for (size_t r = lo; r < hi; ++r) row(r);
  });
}

}  // namespace tok
}  // namespace turbotune
