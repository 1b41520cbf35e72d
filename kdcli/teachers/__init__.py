"""Where a teacher comes from: the store, weights files, timm/tv pretrained weights, the published
CIFAR-100 release (fetch/import). The one place teacher resolution lives.

  store.py        $KD_HOME/teachers/<data>/<arch>.safetensors: find, register, list
  files.py        kd safetensors and RepDistiller/mdistiller .pth files -> a strictly loaded network
  pth.py          .pth read without running code (bounds, pickle scan, torch's safe globals)
  pickle_scan.py  the globals and storages a pickle names, read without unpickling
  release.py      `kd teachers fetch` / `kd teachers import`: the release tar into the store
  download.py     resumable HTTP download with progress
  resolve.py      `--teacher SPEC` -> network; digest and source of a run's teacher
"""

from kdcli.teachers.files import (
    FORMAT, input_metadata, is_weights_path, load_model_file, read_input, read_metadata, save_model,
)
from kdcli.teachers.release import RELEASE_URL, fetch, import_path
from kdcli.teachers.resolve import (
    in_release, is_external, load_network, teacher_digest, teacher_file, teacher_source,
)
from kdcli.teachers.store import (
    check_free, dataset_key, file_sha256, find_teacher, kd_home, list_teachers, register_teacher, teacher_path,
)

__all__ = [
    "FORMAT", "RELEASE_URL", "check_free", "dataset_key", "fetch", "file_sha256", "find_teacher", "import_path",
    "in_release", "input_metadata", "is_external", "is_weights_path", "kd_home", "list_teachers", "load_model_file",
    "load_network", "read_input", "read_metadata", "register_teacher", "save_model", "teacher_digest",
    "teacher_file", "teacher_path", "teacher_source",
]
