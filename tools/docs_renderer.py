"""The API blocks of the docs site: nbdev's `show_doc`, with three things a reader would trip over fixed.

nbdev 2.4 writes a symbol's signature as a Python code block with each parameter's docment as a `# comment`, so
the markdown in a docment (code, links) shows literally; it documents a property with no docstring as "Call self as a
function." (the docstring of the getter's `__call__`) and a method without one with the docstring it inherits from
`object` ("Return repr(self)."); and its heading `### Cls.__repr__` renders `__repr__` as bold. `DocsRenderer` keeps
the block's layout (source link, heading, signature, docstring) and:

- shows the signature without the comments, followed by a table of the documented parameters whose details are
  rendered as markdown;
- drops docstrings that belong to Python itself rather than to the symbol;
- marks properties with `@property` and escapes the heading so names keep their underscores;
- runs, of a cell nbdev executes only because it imports something, just its imports (see
  `_imports_only_for_mixed_cells`).

`proc_notebook` is the worker `build_docs.py` runs in a process pool: it installs the renderer, then processes one
notebook exactly as `nbdev_proc_nbs` does.
"""
import functools, inspect, re, types

def _python_docstrings():
    "Docstrings Python gives objects that do not write their own (object.__repr__, type.__call__, ...)."
    kinds = (object, type, property, types.FunctionType, types.MethodType, types.BuiltinFunctionType, int, str,
             tuple, list, dict, Exception, classmethod, staticmethod, functools.partial, functools.cached_property)
    docs = set()
    for k in kinds:
        docs.add(inspect.getdoc(k))
        for n in dir(k):
            try: docs.add(inspect.getdoc(getattr(k, n)))
            except Exception: pass
    docs.add(inspect.getdoc((lambda: 0).__call__))
    return {d.strip() for d in docs if d}

PYTHON_DOCS = _python_docstrings()

def own_docstring(sym, doc):
    "`doc` unless it is one Python supplies: a builtin's docstring or a dataclass/namedtuple's generated one."
    d = (doc or "").strip()
    if not d or d in PYTHON_DOCS: return ""
    if inspect.isclass(sym) and re.fullmatch(rf"{re.escape(sym.__name__)}\(.*\)", d, flags=re.S): return ""
    if re.fullmatch(r"Alias for field number \d+", d): return ""
    return doc

def _md_escape(s):
    "Escape markdown emphasis and link characters in a heading such as `Cls.__repr__`."
    return re.sub(r"([\\_*\[\]<>`])", r"\\\1", s)

def _cell(s):
    "One table cell: on one line, pipes escaped."
    return re.sub(r"\s*\n\s*", " ", str(s)).replace("|", r"\|").strip()

def install():
    "Make nbdev's `show_doc` use `DocsRenderer` (it looks its default renderer up at each call)."
    import nbdev.showdoc as sd
    from fastcore.docments import DocmentText, _unwrap_sym, _maybe_nm
    base = getattr(sd, "_maisi_base_renderer", sd.BasicMarkdownRenderer)

    class _Sig(DocmentText):
        "A signature without the docment comments (they go in the parameter table)."
        @property
        def params(self): return [(self._fmt_param(k, v), "") for k, v in self.dm.items() if k != "return"]
        @property
        def _ret_str(self):
            ret = self.dm.get("return", {})
            anno = ret.get("anno", inspect.Parameter.empty)
            return f")->{_maybe_nm(anno)}:" if anno is not inspect.Parameter.empty else "):"

    class DocsRenderer(base):
        "nbdev's markdown renderer with docments as a markdown table, Python's own docstrings dropped, properties marked."
        def __init__(self, sym, name=None, title_level=3, maxline=60):  # 60: with the indent, fits the page column unwrapped
            self.is_property = isinstance(sym, (property, functools.cached_property))
            super().__init__(sym, name=name, title_level=title_level, maxline=maxline)
            self.docs = own_docstring(_unwrap_sym(sym), self.docs)

        def _params_md(self):
            dm = getattr(self.dm, "dm", {})
            rows = [(k, v.get("docment")) for k, v in dm.items() if k != "return" and v.get("docment")]
            ret = dm.get("return", {}).get("docment")
            if not rows and not ret: return ""
            out = ["| Parameter | Details |", "|:--|:--|"]
            out += [f"| `{_cell(k)}` | {_cell(d)} |" for k, d in rows]
            if ret: out.append(f"| **Returns** | {_cell(ret)} |")
            return "\n".join(out)

        def _repr_markdown_(self):
            doc = "---\n\n"
            src = sd.NbdevLookup().code(self.fn)
            if src: doc += sd._ext_link(src, "source", 'style="float:right; font-size:smaller"') + "\n\n"
            doc += f"{'#' * self.title_level} {_md_escape(self.nm)}\n\n"
            try: sig = str(_Sig(self.dm.obj, maxline=self.maxline, docstring=False)) if hasattr(self.dm, "obj") else str(self.dm)
            except Exception: sig = str(self.dm)
            if self.is_property: sig = "@property\n" + sig
            doc += f"```python\n{sig}\n```"
            if self.docs: doc += "\n\n" + re.sub(r"^(\s*)(.+)", r"\1*\2*", self.docs, count=1)
            params = self._params_md()
            if params: doc += "\n\n" + params
            return doc

    sd._maisi_base_renderer = base
    sd.BasicMarkdownRenderer = DocsRenderer
    _imports_only_for_mixed_cells()
    return DocsRenderer

def _imports_only_for_mixed_cells():
    """nbdev runs, to make the API blocks, the exported cells, the `show_doc` cells, and every cell that contains an
    import anywhere (even inside a function), whole: a test cell that starts with `import io` runs in a namespace
    without the notebook's other cells, fails, and fails the build, and a cell that computes something repeats that
    work for the docs. Here a cell that is run only for its imports runs only its top-level import statements, and
    its saved outputs are kept."""
    import ast
    import nbdev.processors as pr
    from fastcore.basics import str2bool
    if getattr(pr.exec_show_docs, "_maisi_patched", False): return
    full_dirs = {"export", "exports", "exporti", "exec_doc"}

    def __call__(self, cell):
        if not self.nb.has_docs_ or not hasattr(self, "k"): return
        fm = getattr(self.nb, "frontmatter_", {})
        if str2bool(fm.get("skip_showdoc", False)): return
        if cell.cell_type != "code" or pr.cell_lang(cell) != "python" or not cell.source: return
        if "nbdev_export" + "()" in cell.source: return
        trees = cell.parsed_()
        if not trees or cell.directives_.get("eval:", [""])[0].lower() == "false": return
        if cell.directives_.keys() & full_dirs or pr._show_docs(trees): self.k.cell(cell)
        else:
            imports = [ast.unparse(n) for n in trees if isinstance(n, (ast.Import, ast.ImportFrom))]
            if not imports: return
            self.k.run("\n".join(imports))
        if self.k.exc:
            title = fm.get("title", "")
            raise Exception(f"Error{' in notebook: ' + title if title else ''} in cell {cell.idx_} :\n{cell.source}") from self.k.exc

    pr.exec_show_docs.__call__ = __call__
    pr.exec_show_docs._maisi_patched = True

def proc_notebook(job):
    "Process one notebook for the docs (nbdev's FilterDefaults: show_doc cells run, hidden cells dropped)."
    import os
    src, dst = job
    install()
    from nbdev.processors import FilterDefaults
    from nbdev.serve_drv import exec_nb
    os.environ["IN_TEST"] = "1"
    try: exec_nb(src, dst, FilterDefaults)
    finally: os.environ.pop("IN_TEST", None)
    return str(dst)
