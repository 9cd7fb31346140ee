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
// UTF-8, otherwise Latin-1 / UCS-2 / UCS-4 code points: no conversion, no copy);
// `keep` holds the objects alive. Raises TypeError naming the index.
void text_views(const py::sequence& seq, const char* what, Views& out, std::vector<py::object>& keep) {
  // PySequence_Fast: a list/tuple as is (else a list copy) whose item array is
  // read directly; it is kept alive, and it keeps the strings alive.
  py::object fast = py::reinterpret_steal<py::object>(PySequence_Fast(seq.ptr(), "expected a sequence of str"));
  if (!fast) throw py::error_already_set();
  const size_t n = size_t(PySequence_Fast_GET_SIZE(fast.ptr()));
  PyObject** items = PySequence_Fast_ITEMS(fast.ptr());
  out.resize(n);
  for (size_t i = 0; i < n; ++i) {
    PyObject* o = items[i];
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
  keep.push_back(std::move(fast));
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
                        bool return_special_tokens_mask, int num_threads) {
    if (truncation < 0 || truncation > 3) throw py::value_error("truncation: expected 0..3");
    if (padding < 0 || padding > 2) throw py::value_error("padding: expected 0..2");
    if (pad_to_multiple_of < 0) throw py::value_error("pad_to_multiple_of: expected a positive int or None");
    if (add_special_tokens && (cls_id < 0 || sep_id < 0))
      throw py::value_error("add_special_tokens needs [CLS] and [SEP] in the vocabulary");
    Views a, b;
    std::vector<py::object> keep;
    text_views(texts, "text", a, keep);
    const bool has_pair = !pairs.is_none();
    if (has_pair) {
      text_views(py::reinterpret_borrow<py::sequence>(pairs), "text_pair", b, keep);
      if (b.size() != a.size())
        throw py::value_error("text_pair: expected " + std::to_string(a.size()) + " items (one per text), got " +
                              std::to_string(b.size()));
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
    const size_t n = a.size();
    const py::ssize_t total = py::ssize_t(batch.total);
    py::array_t<int64_t> ids(total);
    py::array_t<int64_t> mask, types, special, offsets;
    tok::OutputBuffers o;
    o.input_ids = ids.mutable_data();
    if (return_attention_mask) { mask = py::array_t<int64_t>(total); o.attention_mask = mask.mutable_data(); }
    if (return_token_type_ids) { types = py::array_t<int64_t>(total); o.token_type_ids = types.mutable_data(); }
    if (return_special_tokens_mask) {
      special = py::array_t<int64_t>(total);
      o.special_tokens_mask = special.mutable_data();
    }
    if (return_offsets) {
      offsets = py::array_t<int64_t>(std::vector<py::ssize_t>{total, 2});
      o.offsets = offsets.mutable_data();
    }
    py::array_t<int64_t> length(static_cast<py::ssize_t>(n)), width(static_cast<py::ssize_t>(n));
    {
      py::gil_scoped_release nogil;
      tok::fill(p, batch, o, pl.get());
    }
    auto* lp = length.mutable_data();
    auto* wp = width.mutable_data();
    for (size_t i = 0; i < n; ++i) {
      lp[i] = batch.length[i];
      wp[i] = batch.width[i];
    }
    py::dict d;
    d["input_ids"] = ids;
    if (return_attention_mask) d["attention_mask"] = mask;
    if (return_token_type_ids) d["token_type_ids"] = types;
    if (return_special_tokens_mask) d["special_tokens_mask"] = special;
    if (return_offsets) d["offset_mapping"] = offsets;
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

  int vocab_size() const { return int(tok_->vocab().size()); }
  int token_to_id(const std::string& t) const { return tok_->token_to_id(t); }

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
           "Encode a list of str (and optional pairs). Returns flat int64 arrays (rows back to back, see "
           "'width') plus 'length' (tokens per row before padding), 'width' and 'uniform'.")
      .def("encode_ragged", &PyTokenizer::encode_ragged, py::arg("texts"), py::kw_only(),
           py::arg("add_special_tokens") = true, py::arg("cls_id") = -1, py::arg("sep_id") = -1,
           py::arg("num_threads") = 1,
           "Raw encoding: (ids int32 [total], row_splits int64 [n + 1]), no padding or truncation.")
      .def_property_readonly("vocab_size", &PyTokenizer::vocab_size)
      .def("token_to_id", &PyTokenizer::token_to_id);
  m.attr("unicode_tables_source") = tok::kUnicodeTablesSource;
}

}  // namespace turbotune
