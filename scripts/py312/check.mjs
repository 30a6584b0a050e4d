// Runs scripts/check_slicer_python.py under CPython 3.12 (Pyodide 0.27.7: CPython 3.12.7 compiled to
// WebAssembly, from the npm registry), with the repository mounted read-only at /repo.
//     npm ci --prefix scripts/py312 && node scripts/py312/check.mjs [ROOT]   (ROOT: the repository, default)
// HOST_STDLIB_MODULES (space-separated sys.stdlib_module_names of another Python, as Testing/test_slicer_versions.py
// sets it) lets the check find imports of modules that Python removed before 3.12.
import { fileURLToPath } from "node:url";
import path from "node:path";
import { loadPyodide } from "pyodide";

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(process.argv[2] ?? path.join(here, "..", ".."));
const pyodide = await loadPyodide();
pyodide.FS.mkdir("/repo");
pyodide.FS.mount(pyodide.FS.filesystems.NODEFS, { root }, "/repo");
pyodide.FS.mkdir("/checker");
pyodide.FS.mount(pyodide.FS.filesystems.NODEFS, { root: path.join(here, "..") }, "/checker");
pyodide.globals.set("host_stdlib", process.env.HOST_STDLIB_MODULES ?? "");
const code = pyodide.runPython(`
import runpy, sys, traceback
sys.argv = ["check_slicer_python.py", "/repo", *(["--stdlib-of-another-python", host_stdlib] if host_stdlib else [])]
try:
    runpy.run_path("/checker/check_slicer_python.py", run_name="__main__")
    status = 0
except SystemExit as exit:
    status = exit.code if isinstance(exit.code, int) else 1
except BaseException:
    traceback.print_exc()
    status = 2
status
`);
process.exit(code);
