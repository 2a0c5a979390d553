// gpumesh._dracoenc: Draco-encode an indexed triangle mesh of quantized positions.
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
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cstdint>
#include <vector>

#include "draco/compression/encode.h"
#include "draco/mesh/mesh.h"

namespace {

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

PyMethodDef methods[] = {
    {"encode", encode, METH_VARARGS,
     "encode(positions, faces, bits, speed) -> bytes: Draco mesh of quantized positions."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_dracoenc", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__dracoenc(void) { return PyModule_Create(&module); }
