from setuptools import find_packages, setup

setup(
    name="bsd_ovpn",
    version="0.1.0",
    description="OpenVPN-protocol tunnels on FreeBSD's if_ovpn(4) data channel offload, "
                "with a userspace engine for hosts without it",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    license="BSD-2-Clause",
    python_requires=">=3.9",
    packages=find_packages(include=["bsd_ovpn", "bsd_ovpn.*"]),
    include_package_data=True,
    package_data={"bsd_ovpn": ["data/*", "data/**/*"]},
    setup_requires=["cffi>=1.15"],
    install_requires=[
        "cffi>=1.15",
        "cryptography>=41",
        "pyOpenSSL>=23.2",
        "click>=8.0",
    ],
    extras_require={"test": ["pytest>=7", "hypothesis>=6", "docutils>=0.18"]},
    cffi_modules=["cdefs/build_native.py:ffibuilder"],
    entry_points={"console_scripts": ["ovpnctl=bsd_ovpn.cli:main"]},
    zip_safe=False,
)
