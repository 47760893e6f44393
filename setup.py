"""The one compiled part: the CPU's exact rank counting (reidcli/retrieval/_cpu.c). Everything else is in
pyproject.toml. Optional: where no C compiler is found the install goes on and the counting runs in torch (same
results, slower)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "reidcli.retrieval._cpu",
            ["reidcli/retrieval/_cpu.c"],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)
