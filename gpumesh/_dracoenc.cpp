// gpumesh._dracoenc: Draco-encode an indexed triangle mesh of quantized positions (and decode a
// fragment as Neuroglancer's client does, for the readers' checks: decode() below).
//
// Why this exists: DracoPy.encode() builds its draco::Mesh through TriangleSoupMeshBuilder,
// which copies every corner's position and then deduplicates values and point ids through
// hash maps.  Our fragments are already indexed and welded (no duplicate positions), so that
// rebuild is about a quarter of the time DracoPy spends per fragment.  This module builds the
// draco::Mesh directly and calls the same encoder with the same settings as
// gpumesh.encode.encode_draco passes to DracoPy, against the Draco library that DracoPy's
// wheel ships (libdraco.a and headers; see setup.py).  Points are numbered in order of first
// use by the faces, as the soup builder numbers them, so the bytes equal DracoPy's.
//
// encode(positions, faces, bits, speed) -> bytes
//   positions: C-contiguous float32 buffer of shape (n, 3), integers in [0, 2**bits)
//   faces:     C-contiguous uint32 buffer of shape (m, 3), m > 0, indices < n
//   bits:      quantization bits; Draco's quantizer is set to the identity on [0, 2**bits - 1]
//   speed:     Draco encoding/decoding speed (10 - DracoPy's compression_level)
//
// Draco's entropy coder, made linear in the symbols (GPUMESH_WRAP_ENCODE_SYMBOLS, Linux): at 16
// quantization bits our positions are multiples of 512 (half-voxel steps), so the parallelogram
// corrections that Draco entropy-codes span ~2^17 values of which a few hundred occur.
// draco::EncodeSymbols sizes its histograms, its rANS probability table and a stable sort by
// the largest value, not by the values that occur: half of the encoder's time on our fragments.
// The linker's --wrap (see setup.py) routes Draco's calls of draco::EncodeSymbols to
// fast_encode_symbols below.  For Draco's "raw" scheme over a large alphabet it codes the
// symbols' ranks among the distinct values with Draco's own RAnsSymbolEncoder: every
// probability, the rANS state and the data bytes depend only on the frequencies in value order,
// which ranking keeps; only the probability table, which lists every value up to the largest
// with runs of zeros (RAnsSymbolEncoder::EncodeTable), is rewritten with those runs.  The
// bytes are Draco's; tests compare them with DracoPy.encode and with Draco's own EncodeSymbols
// (_set_symbol_fast_path(-1)).  Every other case (the tagged scheme, an explicit method, small
// alphabets) goes to Draco's EncodeSymbols unchanged.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "draco/attributes/attribute_quantization_transform.h"
#include "draco/compression/config/compression_shared.h"
#include "draco/compression/decode.h"
#include "draco/compression/encode.h"
#include "draco/compression/entropy/rans_symbol_coding.h"
#include "draco/compression/entropy/rans_symbol_encoder.h"
#include "draco/compression/entropy/shannon_entropy.h"
#include "draco/core/bit_utils.h"
#include "draco/core/encoder_buffer.h"
#include "draco/core/options.h"
#include "draco/core/varint_encoding.h"
#include "draco/mesh/mesh.h"

#ifdef GPUMESH_WRAP_ENCODE_SYMBOLS
// draco::EncodeSymbols(const uint32_t *, int, int, const draco::Options *, draco::EncoderBuffer *)
#define GPUMESH_REAL_ENCODE_SYMBOLS __real__ZN5draco13EncodeSymbolsEPKjiiPKNS_7OptionsEPNS_13EncoderBufferE
#define GPUMESH_WRAP_ENCODE_SYMBOLS_NAME __wrap__ZN5draco13EncodeSymbolsEPKjiiPKNS_7OptionsEPNS_13EncoderBufferE
extern "C" bool GPUMESH_REAL_ENCODE_SYMBOLS(const uint32_t *symbols, int num_values, int num_components,
                                            const draco::Options *options, draco::EncoderBuffer *target);
#endif

namespace {

// A stream whose largest symbol is below this goes to Draco's own EncodeSymbols (its cost there
// is small); -1: every stream does.  Set by _set_symbol_fast_path (tests, bench_encode.py).
std::atomic<long> g_fast_min_alphabet{4096};
std::atomic<unsigned long long> g_fast_calls{0}, g_draco_calls{0};

#ifdef GPUMESH_WRAP_ENCODE_SYMBOLS
// Draco's raw scheme takes at most 18-bit values and fewer than 2^18 distinct ones
constexpr int kMaxRawBitLength = 18;

// The probability table of `dense` (RAnsSymbolEncoder::EncodeTable over the ranks 0..u-1, none
// of zero probability) rewritten for the values `uniques` (ascending): num_symbols = largest
// value + 1, and before each value the zero-probability values below it as run bytes, each
// covering up to 64 values ((count - 1) << 2 | 3).
void expand_table(const draco::EncoderBuffer &dense, const std::vector<uint32_t> &uniques,
                  draco::EncoderBuffer *out) {
  const uint8_t *d = reinterpret_cast<const uint8_t *>(dense.data());
  size_t pos = 0;
  while (d[pos] & 0x80) ++pos;  // the varint of u
  ++pos;
  draco::EncodeVarint<uint32_t>(uniques.back() + 1, out);
  uint32_t next = 0;
  for (const uint32_t value : uniques) {
    for (uint32_t gap = value - next; gap > 0;) {
      const uint32_t run = std::min<uint32_t>(gap, 64);
      out->Encode(static_cast<uint8_t>(((run - 1) << 2) | 3));
      gap -= run;
    }
    const size_t len = 1 + (d[pos] & 3);  // a probability: 1 byte + 0..2 extra bytes
    out->Encode(d + pos, len);
    pos += len;
    next = value + 1;
  }
}

// Why the ranks give Draco's bytes.  RAnsSymbolEncoder::Create, over the full alphabet
// 0..max, gives each value of frequency f > 0 the probability round(f / n * precision) (at
// least 1) and each absent value 0; then, where the sum is off, it stable-sorts all values by
// probability and (a) adds a shortfall to the last of the most probable, or (b) walks down from
// the most probable, lowering each (by at least 1) until the excess is gone, stopping at the
// first probability <= 1 and never visiting sorted position 0, and starts again from the top
// while an excess remains.  Over the ranks the sorted order of the present values is the same
// (the sort is stable and ranks keep value order); the absent values, probability 0, only sat
// below them.  The one difference is that the lowest present value now sits at position 0:
// (b) reaches it only if every present value has probability > 1 and the excess is at least
// u (the count of present values), but then no value was raised to 1 and each rounding adds
// at most 1/2, so the excess is below u/2.  So every probability is Draco's, and with it the
// cumulative probabilities over the present values, the expected bit count (which sizes the
// output buffer) and every rANS step.  Only EncodeTable's listing differs: expand_table.
template <class Encoder>
bool encode_ranks(const std::vector<uint32_t> &ranks, const std::vector<uint64_t> &freq,
                  const std::vector<uint32_t> &uniques, draco::EncoderBuffer *target) {
  Encoder enc;
  draco::EncoderBuffer dense;
  if (!enc.Create(freq.data(), static_cast<int>(freq.size()), &dense)) return false;
  expand_table(dense, uniques, target);
  enc.StartEncoding(target);
  for (size_t i = ranks.size(); i-- > 0;) enc.EncodeSymbol(ranks[i]);  // rANS codes in reverse
  enc.EndEncoding(target);
  return true;
}

template <int... N>
bool encode_ranks_with(int bit_length, std::integer_sequence<int, N...>, const std::vector<uint32_t> &ranks,
                       const std::vector<uint64_t> &freq, const std::vector<uint32_t> &uniques,
                       draco::EncoderBuffer *target) {
  bool ok = false;
  ((bit_length == N + 1 ? (ok = encode_ranks<draco::RAnsSymbolEncoder<N + 1>>(ranks, freq, uniques, target), 0) : 0),
   ...);
  return ok;
}

// draco::EncodeSymbols where Draco would choose its raw scheme over an alphabet of at least
// g_fast_min_alphabet values: 1 coded, 0 failed (as Draco would), -1 not handled here.
int fast_encode_symbols(const uint32_t *symbols, int num_values, int num_components, const draco::Options *options,
                        draco::EncoderBuffer *target) {
  const long min_alphabet = g_fast_min_alphabet.load(std::memory_order_relaxed);
  if (min_alphabet < 0 || num_values <= 0) return -1;
  if (options != nullptr && options->IsOptionSet("symbol_encoding_method")) return -1;
  if (num_components <= 0) num_components = 1;
  if (num_values % num_components != 0) return -1;
  const uint32_t max_value = *std::max_element(symbols, symbols + num_values);
  if (max_value < static_cast<uint64_t>(min_alphabet)) return -1;
  if (draco::MostSignificantBit(std::max(1u, max_value)) + 1 > kMaxRawBitLength) return -1;  // tagged
  // bit length of each entry (its largest component), as the tagged scheme would code them
  std::vector<uint32_t> bit_lengths;
  bit_lengths.reserve(num_values / num_components);
  uint64_t total_bit_length = 0;
  for (int i = 0; i < num_values; i += num_components) {
    uint32_t m = symbols[i];
    for (int j = 1; j < num_components; ++j) m = std::max(m, symbols[i + j]);
    const uint32_t bl = (m > 0 ? draco::MostSignificantBit(m) : 0) + 1;
    bit_lengths.push_back(bl);
    total_bit_length += bl;
  }

  // ranks of the values among the distinct values, through a table indexed by value
  thread_local std::vector<uint32_t> table(size_t(1) << kMaxRawBitLength, 0);
  std::vector<uint32_t> uniques;
  for (int i = 0; i < num_values; ++i) {
    if (table[symbols[i]]++ == 0) uniques.push_back(symbols[i]);
  }
  std::sort(uniques.begin(), uniques.end());
  const int u = static_cast<int>(uniques.size());
  std::vector<uint64_t> freq(u);
  for (int r = 0; r < u; ++r) {
    freq[r] = table[uniques[r]];
    table[uniques[r]] = static_cast<uint32_t>(r);
  }
  std::vector<uint32_t> ranks(num_values);
  for (int i = 0; i < num_values; ++i) ranks[i] = table[symbols[i]];
  for (const uint32_t value : uniques) table[value] = 0;

  // Draco's choice of scheme: the Shannon entropy sums over the values in ascending order,
  // which the ranks keep, so both estimates are Draco's to the bit
  int tag_unique = 0, raw_unique = 0;
  const int64_t tagged_bits =
      draco::ComputeShannonEntropy(bit_lengths.data(), static_cast<int>(bit_lengths.size()), 32, &tag_unique) +
      draco::ApproximateRAnsFrequencyTableBits(tag_unique, tag_unique) +
      static_cast<int64_t>(total_bit_length * num_components);
  const int64_t raw_bits = draco::ComputeShannonEntropy(ranks.data(), num_values, u - 1, &raw_unique) +
                           draco::ApproximateRAnsFrequencyTableBits(max_value, u);
  if (tagged_bits < raw_bits) return -1;
  int bit_length = draco::MostSignificantBit(static_cast<uint32_t>(u)) + 1;
  if (bit_length > kMaxRawBitLength) return -1;  // Draco refuses it
  int level = 7;  // Draco's default symbol coding compression level
  if (options != nullptr && options->IsOptionSet("symbol_encoding_compression_level")) {
    level = options->GetInt("symbol_encoding_compression_level");
  }
  bit_length += level < 4 ? -2 : level < 6 ? -1 : level > 9 ? 2 : level > 7 ? 1 : 0;
  bit_length = std::min(std::max(1, bit_length), kMaxRawBitLength);
  target->Encode(static_cast<uint8_t>(draco::SYMBOL_CODING_RAW));
  target->Encode(static_cast<uint8_t>(bit_length));
  return encode_ranks_with(bit_length, std::make_integer_sequence<int, kMaxRawBitLength>(), ranks, freq, uniques,
                           target)
             ? 1
             : 0;
}
#endif  // GPUMESH_WRAP_ENCODE_SYMBOLS

struct Buffer {
  Py_buffer view{};
  bool held = false;
  ~Buffer() {
    if (held) PyBuffer_Release(&view);
  }
  bool get(PyObject *obj, const char *format, const char *name) {
    if (PyObject_GetBuffer(obj, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_ND) != 0) return false;
    held = true;
    const char *fmt = view.format != nullptr ? view.format : "";
    if (*fmt == '<' || *fmt == '=' || *fmt == '@') ++fmt;  // native little-endian only (x86, ARM)
    // uint32 is 'I' (or 'L' where long is 32 bits); float32 is 'f'
    const bool kind_ok = format[0] == 'f' ? fmt[0] == 'f' : (fmt[0] == 'I' || fmt[0] == 'L');
    if (view.ndim != 2 || view.shape[1] != 3 || view.itemsize != 4 || !kind_ok || fmt[1] != '\0') {
      PyErr_Format(PyExc_ValueError, "%s must be a C-contiguous (n, 3) array of dtype %s", name,
                   format[0] == 'f' ? "float32" : "uint32");
      return false;
    }
    return true;
  }
};

PyObject *encode(PyObject *, PyObject *args) {
  PyObject *pos_obj, *face_obj;
  int bits, speed;
  if (!PyArg_ParseTuple(args, "OOii", &pos_obj, &face_obj, &bits, &speed)) return nullptr;
  if (bits < 1 || bits > 30 || speed < 0 || speed > 10) {
    PyErr_SetString(PyExc_ValueError, "bits must be in 1..30 and speed in 0..10");
    return nullptr;
  }
  Buffer pos, fac;
  if (!pos.get(pos_obj, "f", "positions") || !fac.get(face_obj, "I", "faces")) return nullptr;
  const float *p = static_cast<const float *>(pos.view.buf);
  const uint32_t *f = static_cast<const uint32_t *>(fac.view.buf);
  const Py_ssize_t nv = pos.view.shape[0], nf = fac.view.shape[0];
  if (nf == 0) {
    PyErr_SetString(PyExc_ValueError, "a fragment needs at least one triangle");
    return nullptr;
  }

  std::vector<char> out;
  bool ok = true, bad_index = false;
  Py_BEGIN_ALLOW_THREADS
  // number the points in order of first use, as draco::TriangleSoupMeshBuilder does
  std::vector<int64_t> point_of(nv, -1);
  std::vector<float> values;
  values.reserve(3 * static_cast<size_t>(nv));
  draco::Mesh mesh;
  mesh.SetNumFaces(static_cast<size_t>(nf));
  uint32_t num_points = 0;
  for (Py_ssize_t t = 0; t < nf && !bad_index; ++t) {
    draco::Mesh::Face face;
    for (int c = 0; c < 3; ++c) {
      const uint32_t v = f[3 * t + c];
      if (v >= static_cast<uint64_t>(nv)) {
        bad_index = true;
        break;
      }
      if (point_of[v] < 0) {
        point_of[v] = num_points++;
        values.insert(values.end(), p + 3 * static_cast<size_t>(v), p + 3 * static_cast<size_t>(v) + 3);
      }
      face[c] = static_cast<uint32_t>(point_of[v]);
    }
    mesh.SetFace(draco::FaceIndex(static_cast<uint32_t>(t)), face);
  }
  if (!bad_index) {
    draco::GeometryAttribute att;
    att.Init(draco::GeometryAttribute::POSITION, nullptr, 3, draco::DT_FLOAT32, false, 3 * sizeof(float), 0);
    const int att_id = mesh.AddAttribute(att, true, num_points);
    mesh.set_num_points(num_points);
    mesh.attribute(att_id)->buffer()->Write(0, values.data(), values.size() * sizeof(float));
    draco::Encoder encoder;
    encoder.SetSpeedOptions(speed, speed);
    const float origin[3] = {0.f, 0.f, 0.f};
    encoder.SetAttributeExplicitQuantization(draco::GeometryAttribute::POSITION, bits, 3, origin,
                                             static_cast<float>((1u << bits) - 1));
    draco::EncoderBuffer buffer;
    ok = encoder.EncodeMeshToBuffer(mesh, &buffer).ok();
    if (ok) out.assign(buffer.data(), buffer.data() + buffer.size());
  }
  Py_END_ALLOW_THREADS
  if (bad_index) {
    PyErr_SetString(PyExc_IndexError, "face index out of range of the positions");
    return nullptr;
  }
  if (!ok) {
    PyErr_SetString(PyExc_RuntimeError, "Draco failed to encode the fragment");
    return nullptr;
  }
  return PyBytes_FromStringAndSize(out.data(), static_cast<Py_ssize_t>(out.size()));
}

// decode(data) -> (positions, faces, quantization): what Neuroglancer's client reads from a fragment
// (neuroglancer_draco.cc): Draco decodes it with the position attribute's transform skipped, so
// positions are Draco's stored integers, not dequantized ones.  positions: bytes of uint32 (n, 3)
// in attribute-value order, faces: bytes of uint32 (m, 3) indices into them (each corner's point
// mapped to its attribute value, as the client maps it), quantization: (bits, (origin x, y, z),
// range) of the Draco quantization the decoding skipped, or None.  ValueError, as the
// client fails, when Draco cannot decode the bytes, the geometry is not a triangle mesh, or the
// position attribute is missing, not 3 components, not per corner, not one value per point, or
// not integers (an unquantized float32 attribute, whose bits the client would take as integers).
PyObject *decode(PyObject *, PyObject *args) {
  Py_buffer view;
  if (!PyArg_ParseTuple(args, "y*", &view)) return nullptr;
  const char *error = nullptr;
  std::string detail;
  std::vector<uint32_t> positions, faces;
  int qbits = -1;   // the skipped quantization: bits, origin, range (-1: none)
  float origin[3] = {0.f, 0.f, 0.f}, range = 0.f;
  Py_BEGIN_ALLOW_THREADS
  draco::DecoderBuffer buffer;
  buffer.Init(static_cast<const char *>(view.buf), static_cast<size_t>(view.len));
  draco::Decoder decoder;
  decoder.SetSkipAttributeTransform(draco::GeometryAttribute::POSITION);
  auto kind = draco::Decoder::GetEncodedGeometryType(&buffer);
  auto decoded = decoder.DecodeMeshFromBuffer(&buffer);
  if (kind.ok() && kind.value() == draco::POINT_CLOUD) {
    error = "a point cloud, not a triangle mesh";
  } else if (!decoded.ok()) {
    error = "Draco cannot decode it";
    detail = decoded.status().error_msg_string();
  } else {
    const draco::Mesh *mesh = decoded.value().get();
    const draco::PointAttribute *att = mesh->GetNamedAttribute(draco::GeometryAttribute::POSITION);
    if (att == nullptr) {
      error = "no position attribute";
    } else if (att->num_components() != 3) {
      error = "positions do not have 3 components";
    } else if (att->data_type() != draco::DT_INT32 && att->data_type() != draco::DT_UINT32) {
      error = "positions are not quantized integers (Draco stored them unquantized)";
    } else if (mesh->GetAttributeElementType(att->unique_id()) != draco::MESH_CORNER_ATTRIBUTE) {
      error = "positions are not a per-corner attribute";
    } else if (att->size() != mesh->num_points()) {
      error = "the position attribute does not hold one value per point";
    } else {
      draco::AttributeQuantizationTransform quantization;
      if (quantization.InitFromAttribute(*att)) {
        qbits = quantization.quantization_bits();
        for (int a = 0; a < 3; ++a) origin[a] = quantization.min_value(a);
        range = quantization.range();
      }
      positions.resize(3 * static_cast<size_t>(att->size()));
      if (!positions.empty()) {
        att->buffer()->Read(att->GetBytePos(draco::AttributeValueIndex(0)), positions.data(),
                            positions.size() * sizeof(uint32_t));
      }
      // the client's indices: each corner's point, through the attribute's point-to-value map
      const bool identity = att->is_mapping_identity();
      faces.resize(3 * static_cast<size_t>(mesh->num_faces()));
      for (draco::FaceIndex f(0); f < mesh->num_faces(); ++f) {
        const draco::Mesh::Face &face = mesh->face(f);
        for (int c = 0; c < 3; ++c) {
          faces[3 * f.value() + c] = identity ? face[c].value() : att->mapped_index(face[c]).value();
        }
      }
    }
  }
  Py_END_ALLOW_THREADS
  PyBuffer_Release(&view);
  if (error != nullptr) {
    PyErr_Format(PyExc_ValueError, "%s%s%s", error, detail.empty() ? "" : ": ", detail.c_str());
    return nullptr;
  }
  PyObject *quant = qbits < 0 ? Py_BuildValue("")
                              : Py_BuildValue("(i(ddd)d)", qbits, static_cast<double>(origin[0]),
                                              static_cast<double>(origin[1]), static_cast<double>(origin[2]),
                                              static_cast<double>(range));
  if (quant == nullptr) return nullptr;
  return Py_BuildValue("(y#y#N)", reinterpret_cast<const char *>(positions.data()),
                       static_cast<Py_ssize_t>(positions.size() * sizeof(uint32_t)),
                       reinterpret_cast<const char *>(faces.data()),
                       static_cast<Py_ssize_t>(faces.size() * sizeof(uint32_t)), quant);
}

// _set_symbol_fast_path(min_alphabet) -> previous: alphabets from min_alphabet on take the fast
// path; -1: none (Draco's EncodeSymbols for every call).  Returns None where it is not built.
PyObject *set_symbol_fast_path(PyObject *, PyObject *args) {
  long value;
  if (!PyArg_ParseTuple(args, "l", &value)) return nullptr;
#ifdef GPUMESH_WRAP_ENCODE_SYMBOLS
  return PyLong_FromLong(g_fast_min_alphabet.exchange(value));
#else
  (void)value;
  Py_RETURN_NONE;
#endif
}

// _symbol_calls() -> (fast, draco): calls of draco::EncodeSymbols coded by each path so far.
PyObject *symbol_calls(PyObject *, PyObject *) {
  return Py_BuildValue("(KK)", g_fast_calls.load(), g_draco_calls.load());
}

PyMethodDef methods[] = {
    {"encode", encode, METH_VARARGS,
     "encode(positions, faces, bits, speed) -> bytes: Draco mesh of quantized positions."},
    {"decode", decode, METH_VARARGS,
     "decode(data) -> (positions, faces, quantization): uint32 bytes as Neuroglancer's client reads them "
     "(no dequantization), and the skipped quantization (bits, origin, range) or None."},
    {"_set_symbol_fast_path", set_symbol_fast_path, METH_VARARGS,
     "_set_symbol_fast_path(min_alphabet) -> previous value, or None where not built (-1: Draco's path only)."},
    {"_symbol_calls", symbol_calls, METH_NOARGS,
     "_symbol_calls() -> (fast, draco): symbol streams coded by the fast path and by Draco's EncodeSymbols."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_dracoenc", nullptr, -1, methods};

}  // namespace

#ifdef GPUMESH_WRAP_ENCODE_SYMBOLS
extern "C" bool GPUMESH_WRAP_ENCODE_SYMBOLS_NAME(const uint32_t *symbols, int num_values, int num_components,
                                                 const draco::Options *options, draco::EncoderBuffer *target) {
  const int done = fast_encode_symbols(symbols, num_values, num_components, options, target);
  if (done >= 0) {
    g_fast_calls.fetch_add(1, std::memory_order_relaxed);
    return done == 1;
  }
  g_draco_calls.fetch_add(1, std::memory_order_relaxed);
  return GPUMESH_REAL_ENCODE_SYMBOLS(symbols, num_values, num_components, options, target);
}
#endif

PyMODINIT_FUNC PyInit__dracoenc(void) { return PyModule_Create(&module); }
