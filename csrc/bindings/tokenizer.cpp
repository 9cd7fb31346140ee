// pybind11 layer of the WordPiece tokenizer: converts Python strings to UTF-8
// views (with the GIL), encodes and post-processes with the GIL released on a
// thread pool, and writes the results straight into int64 numpy buffers.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <unistd.h>

#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "bindings/bindings.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/unicode_tables.h"

namespace py = pybind11;

namespace turbotune {
namespace {

using Views = std::vector<tok::TextView>;

// Views of the str items of seq, borrowed from Python's own storage (ASCII as
// UTF-8, otherwise Latin-1 / UCS-2 / UCS-4 code points: no conversion, no copy).
// The views are read with the GIL released, so the strings must stay alive
// whatever other threads do meanwhile: a tuple cannot change and is kept as is;
// any other sequence (a list that another thread may clear, which would free
// its strings mid-encode) is first copied into a new tuple, which holds a
// strong reference to every item. `keep` holds that tuple for the call.
// Raises TypeError naming the index of a non-str item.
void text_views(const py::sequence& seq, const char* what, Views& out, std::vector<py::object>& keep) {
  if (PyUnicode_Check(seq.ptr())) throw py::type_error(std::string(what) + ": expected a list of str, got a str");
  py::object items_owner;
  if (PyTuple_Check(seq.ptr())) {
    items_owner = py::reinterpret_borrow<py::object>(seq);
  } else {
    items_owner = py::reinterpret_steal<py::object>(PySequence_Tuple(seq.ptr()));
    if (!items_owner) throw py::error_already_set();
  }
  const size_t n = size_t(PyTuple_GET_SIZE(items_owner.ptr()));
  out.resize(n);
  for (size_t i = 0; i < n; ++i) {
    PyObject* o = PyTuple_GET_ITEM(items_owner.ptr(), py::ssize_t(i));
    if (!PyUnicode_Check(o)) {
      throw py::type_error(std::string(what) + "[" + std::to_string(i) + "]: expected str, got " +
                           std::string(Py_TYPE(o)->tp_name));
    }
#if PY_VERSION_HEX < 0x030C0000
    if (PyUnicode_READY(o) != 0) throw py::error_already_set();
#endif
    const size_t len = size_t(PyUnicode_GET_LENGTH(o));
    if (PyUnicode_IS_ASCII(o)) {
      out[i] = tok::TextView{PyUnicode_DATA(o), len, 0};
    } else {
      out[i] = tok::TextView{PyUnicode_DATA(o), len, uint8_t(PyUnicode_KIND(o))};
    }
  }
  keep.push_back(std::move(items_owner));
}

// Row offsets of pre-split words (None: one text per row): n + 1 ints from 0
// to the number of words, non-decreasing.
void word_splits(const py::object& obj, const char* what, size_t nwords, std::vector<int64_t>& out) {
  out.clear();
  if (obj.is_none()) return;
  try {
    out = obj.cast<std::vector<int64_t>>();
  } catch (const py::cast_error&) {
    throw py::type_error(std::string(what) + ": expected a sequence of int row offsets");
  }
  if (out.empty() || out.front() != 0 || out.back() != int64_t(nwords))
    throw py::value_error(std::string(what) + ": expected row offsets from 0 to " + std::to_string(nwords));
  for (size_t i = 1; i < out.size(); ++i)
    if (out[i] < out[i - 1]) throw py::value_error(std::string(what) + ": row offsets must not decrease");
}

[[noreturn]] void raise_surrogate(const char* what, int64_t i) {
  throw py::value_error(std::string(what) + "[" + std::to_string(i) +
                        "]: the string contains a lone surrogate code point (U+D800..U+DFFF), which is not "
                        "valid Unicode text and cannot be encoded as UTF-8");
}

class PyTokenizer {
 public:
  PyTokenizer(std::vector<std::string> vocab, const std::string& unk_token, std::vector<std::string> special_tokens,
              bool lowercase, bool strip_accents, bool clean_text, bool handle_chinese_chars,
              const std::string& prefix, int max_input_chars_per_word) {
    tok::Options o;
    o.lowercase = lowercase;
    o.strip_accents = strip_accents;
    o.clean_text = clean_text;
    o.handle_chinese_chars = handle_chinese_chars;
    o.unk_token = unk_token;
    o.continuing_subword_prefix = prefix;
    o.max_input_chars_per_word = max_input_chars_per_word;
    tok_ = std::make_unique<tok::Tokenizer>(std::move(vocab), std::move(o), std::move(special_tokens));
  }

  std::shared_ptr<tok::ThreadPool> pool(int threads) {
    if (threads <= 1) return nullptr;
    std::lock_guard<std::mutex> lk(mu_);
    if (pool_ && pool_pid_ != getpid()) {
      // A fork (e.g. a DataLoader worker) copied the pool but not its threads:
      // joining them would hang, so the copy is leaked and a new pool started.
      new std::shared_ptr<tok::ThreadPool>(std::move(pool_));
      pool_.reset();
    }
    if (!pool_ || pool_->threads() < threads) {
      pool_ = std::make_shared<tok::ThreadPool>(threads);
      pool_pid_ = getpid();
    }
    return pool_;
  }

  py::dict encode_batch(const py::sequence& texts, const py::object& pairs, bool add_special_tokens, int cls_id,
                        int sep_id, int pad_id, int pad_type_id, int truncation, int64_t max_length,
                        bool truncate_left, int padding, int64_t pad_to_multiple_of, bool pad_left,
                        bool return_offsets, bool return_attention_mask, bool return_token_type_ids,
                        bool return_special_tokens_mask, int num_threads, const py::object& extra) {
    // The options the plain call never uses come packed in one argument (None on that path: every
    // argument pybind11 parses costs ~50 ns, a few percent of a small batch's call):
    // (text_splits, pair_splits, stride, overflow, return_word_ids).
    py::object text_splits = py::none(), pair_splits = py::none();
    int64_t stride = 0;
    bool overflow = false, return_word_ids = false;
    if (!extra.is_none()) {
      auto t = extra.cast<py::tuple>();
      if (t.size() != 5) throw py::value_error("extra: expected (text_splits, pair_splits, stride, overflow, word_ids)");
      text_splits = t[0];
      pair_splits = t[1];
      stride = t[2].cast<int64_t>();
      overflow = t[3].cast<bool>();
      return_word_ids = t[4].cast<bool>();
    }
    if (truncation < 0 || truncation > 3) throw py::value_error("truncation: expected 0..3");
    if (padding < 0 || padding > 2) throw py::value_error("padding: expected 0..2");
    if (pad_to_multiple_of < 0) throw py::value_error("pad_to_multiple_of: expected a positive int or None");
    if (stride < 0) throw py::value_error("stride: expected a non-negative int");
    if (add_special_tokens && (cls_id < 0 || sep_id < 0))
      throw py::value_error("add_special_tokens needs [CLS] and [SEP] in the vocabulary");
    tok::TextBatch a, b;
    std::vector<py::object> keep;
    text_views(texts, "text", a.views, keep);
    word_splits(text_splits, "text_splits", a.views.size(), a.splits);
    const bool has_pair = !pairs.is_none();
    if (has_pair) {
      text_views(py::reinterpret_borrow<py::sequence>(pairs), "text_pair", b.views, keep);
      word_splits(pair_splits, "pair_splits", b.views.size(), b.splits);
      if (b.rows() != a.rows())
        throw py::value_error("text_pair: expected " + std::to_string(a.rows()) + " items (one per text), got " +
                              std::to_string(b.rows()));
    }
    tok::EncodeParams p;
    p.add_special_tokens = add_special_tokens;
    p.cls_id = cls_id;
    p.sep_id = sep_id;
    p.pad_id = pad_id;
    p.pad_type_id = pad_type_id;
    p.truncation = tok::Truncation(truncation);
    p.max_length = max_length;
    p.truncate_left = truncate_left;
    p.padding = tok::Padding(padding);
    p.pad_to_multiple_of = pad_to_multiple_of;
    p.pad_left = pad_left;
    p.with_offsets = return_offsets;
    p.with_words = return_word_ids;
    p.overflow = overflow;
    p.stride = stride;
    p.num_threads = num_threads < 1 ? 1 : num_threads;
    auto pl = pool(p.num_threads);
    tok::EncodedBatch batch;
    {
      py::gil_scoped_release nogil;
      tok::encode_batch(*tok_, a, has_pair ? &b : nullptr, p, pl.get(), batch);
    }
    if (batch.bad_text >= 0) raise_surrogate("text", batch.bad_text);
    if (batch.bad_pair >= 0) raise_surrogate("text_pair", batch.bad_pair);
    {
      py::gil_scoped_release nogil;
      tok::finalize(p, batch);
    }
    const size_t m = batch.rows.size();
    const py::ssize_t total = py::ssize_t(batch.total);
    // Only the requested arrays are created (a default-constructed py::array_t is a real,
    // empty numpy array: about a microsecond each, on every call).
    py::dict d;
    tok::OutputBuffers o;
    auto int64_out = [&](const char* key) {
      py::array_t<int64_t> a(total);
      d[key] = a;
      return a.mutable_data();
    };
    o.input_ids = int64_out("input_ids");
    if (return_attention_mask) o.attention_mask = int64_out("attention_mask");
    if (return_token_type_ids) o.token_type_ids = int64_out("token_type_ids");
    if (return_special_tokens_mask) o.special_tokens_mask = int64_out("special_tokens_mask");
    if (return_offsets) {
      py::array_t<int64_t> a(std::vector<py::ssize_t>{total, 2});
      d["offset_mapping"] = a;
      o.offsets = a.mutable_data();
    }
    if (return_word_ids) {
      py::array_t<int32_t> words(total);
      py::array_t<int8_t> seq_ids(total);
      o.word_ids = words.mutable_data();
      o.sequence_ids = seq_ids.mutable_data();
      d["word_ids"] = words;
      d["sequence_ids"] = seq_ids;
    }
    py::array_t<int64_t> length(static_cast<py::ssize_t>(m)), width(static_cast<py::ssize_t>(m));
    {
      py::gil_scoped_release nogil;
      tok::fill(p, batch, o, pl.get());
    }
    auto* lp = length.mutable_data();
    auto* wp = width.mutable_data();
    for (size_t r = 0; r < m; ++r) {
      lp[r] = batch.length[r];
      wp[r] = batch.width[r];
    }
    if (overflow) {
      py::array_t<int64_t> sample(static_cast<py::ssize_t>(m));
      auto* sp = sample.mutable_data();
      for (size_t r = 0; r < m; ++r) sp[r] = batch.rows[r].src;
      d["overflow_to_sample_mapping"] = sample;
    }
    d["length"] = length;
    d["width"] = width;
    d["uniform"] = batch.uniform;
    return d;
  }

  // (ids int32 [total], row_splits int64 [n + 1]); ids is a view of the C++ buffer (no copy).
  py::tuple encode_ragged(const py::sequence& texts, bool add_special_tokens, int cls_id, int sep_id,
                          int num_threads) {
    Views a;
    std::vector<py::object> keep;
    text_views(texts, "text", a, keep);
    if (add_special_tokens && (cls_id < 0 || sep_id < 0))
      throw py::value_error("add_special_tokens needs [CLS] and [SEP] in the vocabulary");
    num_threads = num_threads < 1 ? 1 : num_threads;
    auto pl = pool(num_threads);
    auto* ids = new tok::RaggedIds();
    py::capsule owner(ids, [](void* p) { delete static_cast<tok::RaggedIds*>(p); });
    std::vector<int64_t> splits;
    int64_t bad;
    {
      py::gil_scoped_release nogil;
      bad = tok::encode_ragged(*tok_, a, add_special_tokens ? cls_id : -1, add_special_tokens ? sep_id : -1,
                               num_threads, pl.get(), *ids, splits);
    }
    if (bad >= 0) raise_surrogate("text", bad);  // the capsule frees ids
    py::array_t<int32_t> arr({py::ssize_t(ids->size())}, {py::ssize_t(sizeof(int32_t))}, ids->data(), owner);
    py::array_t<int64_t> rs(py::ssize_t(splits.size()));
    std::memcpy(rs.mutable_data(), splits.data(), splits.size() * sizeof(int64_t));
    return py::make_tuple(arr, rs);
  }

 private:
  std::unique_ptr<tok::Tokenizer> tok_;
  std::mutex mu_;
  std::shared_ptr<tok::ThreadPool> pool_;
  pid_t pool_pid_ = 0;
};

}  // namespace

void bind_tokenizer(py::module_& m) {
  py::class_<PyTokenizer>(m, "WordPieceTokenizer",
                          "Native BERT WordPiece tokenizer (see turbotune.tokenizers.BertTokenizer).")
      .def(py::init<std::vector<std::string>, const std::string&, std::vector<std::string>, bool, bool, bool, bool,
                    const std::string&, int>(),
           py::arg("vocab"), py::kw_only(), py::arg("unk_token") = "[UNK]",
           py::arg("special_tokens") = std::vector<std::string>{}, py::arg("lowercase") = true,
           py::arg("strip_accents") = true, py::arg("clean_text") = true, py::arg("handle_chinese_chars") = true,
           py::arg("continuing_subword_prefix") = "##", py::arg("max_input_chars_per_word") = 100)
      .def("encode_batch", &PyTokenizer::encode_batch, py::arg("texts"), py::arg("pairs") = py::none(),
           py::arg("add_special_tokens") = true, py::arg("cls_id") = -1, py::arg("sep_id") = -1,
           py::arg("pad_id") = 0, py::arg("pad_type_id") = 0, py::arg("truncation") = 0,
           py::arg("max_length") = -1, py::arg("truncate_left") = false, py::arg("padding") = 0,
           py::arg("pad_to_multiple_of") = 0, py::arg("pad_left") = false, py::arg("return_offsets") = false,
           py::arg("return_attention_mask") = true, py::arg("return_token_type_ids") = true,
           py::arg("return_special_tokens_mask") = false, py::arg("num_threads") = 1,
           py::arg("extra") = py::none(),
           "Encode a list of str (and optional pairs). Returns flat int64 arrays (rows back to back, see "
           "'width') plus 'length' (tokens per row before padding), 'width' and 'uniform'. extra = None or "
           "(text_splits, pair_splits, stride, overflow, return_word_ids): with text_splits / pair_splits "
           "(n + 1 row offsets) the texts are pre-split words; overflow adds the overflowing rows and "
           "'overflow_to_sample_mapping'; return_word_ids adds 'word_ids' (int32) and 'sequence_ids' "
           "(int8), -1 = None.")
      .def("encode_ragged", &PyTokenizer::encode_ragged, py::arg("texts"), py::kw_only(),
           py::arg("add_special_tokens") = true, py::arg("cls_id") = -1, py::arg("sep_id") = -1,
           py::arg("num_threads") = 1,
           "Raw encoding: (ids int32 [total], row_splits int64 [n + 1]), no padding or truncation.");
  m.attr("unicode_tables_source") = tok::kUnicodeTablesSource;
}

}  // namespace turbotune
