"""The optional compiled fast path of the reader; everything else is in pyproject.toml.

`optional=True`: where no C compiler is at hand, the install still succeeds and the reader uses msgspec alone.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "amplitude_export._fastparse",
            ["src/amplitude_export/_fastparse.c"],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)
