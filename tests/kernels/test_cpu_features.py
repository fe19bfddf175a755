"""cpu_features: the ISA read from /proc/cpuinfo texts of real kinds of CPU, the MARSERVE_NATIVE_ISA cap
(only ever down from the host's ISA), and the compiler flags native_build derives from the pair."""

from __future__ import annotations

import pytest
import torch

from marserve_kernels import cpu_features, native_build

# Excerpts of /proc/cpuinfo as these CPUs print it (first processor only; later lines must not matter).
INTEL_XEON_AVX512 = """\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c \
avx2 bmi1 bmi2 avx512f avx512dq rdseed adx avx512ifma clflushopt clwb avx512cd sha_ni avx512bw avx512vl \
avx512vbmi avx512_vnni
vmx flags\t: vnmi preemption_timer invvpid ept_x_only
bugs\t\t: spectre_v1 spectre_v2

processor\t: 1
flags\t\t: fpu sse sse2
"""
AMD_ZEN3 = """\
processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7R13 Processor
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep sse sse2 ssse3 fma cx16 sse4_1 sse4_2 popcnt aes \
xsave avx f16c rdrand bmi1 avx2 smep bmi2 erms invpcid rdseed adx sha_ni vaes vpclmulqdq rdpid fsrm
bugs\t\t: sysret_ss_attrs spectre_v1 spectre_v2
"""
AARCH64 = """\
processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop \
asimddp ssbs
CPU implementer\t: 0x41
"""
OLD_X86_NO_AVX2 = """\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) CPU E5-2670 0 @ 2.60GHz
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep sse sse2 ssse3 cx16 sse4_1 sse4_2 popcnt aes xsave avx
"""


@pytest.mark.parametrize("text, machine, present, absent, isa", [
    (INTEL_XEON_AVX512, "x86_64", {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma"}, {"vnmi"},
     "avx512"),
    (AMD_ZEN3, "x86_64", {"avx2", "fma", "avx"}, {"avx512f"}, "avx2"),
    (AARCH64, "aarch64", {"asimd", "fp", "asimddp"}, {"avx2"}, "generic"),
    (OLD_X86_NO_AVX2, "x86_64", {"avx", "sse4_2"}, {"avx2", "fma"}, "generic"),
], ids=["intel-avx512", "amd-zen3", "aarch64", "x86-no-avx2"])
def test_cpu_flags_and_isa_of_real_cpuinfo(text, machine, present, absent, isa):
    flags = cpu_features.cpu_flags(text)
    assert present <= flags
    assert not (absent & flags)  # only the first processor's flags line, not "vmx flags" or a later CPU's
    assert cpu_features.isa_of(flags, machine) == isa


def test_cpu_flags_of_text_without_flags_is_empty():
    assert cpu_features.cpu_flags("processor\t: 0\nmodel name\t: mystery\n") == frozenset()


def test_isa_of_needs_every_flag_of_a_level():
    full = cpu_features.cpu_flags(INTEL_XEON_AVX512)
    assert cpu_features.isa_of(full - {"avx512vl"}, "x86_64") == "avx2"  # AVX-512F alone (Knights Landing)
    assert cpu_features.isa_of(frozenset({"avx2"}), "x86_64") == "generic"  # AVX2 without FMA
    assert cpu_features.isa_of(full, "AMD64") == "avx512"  # Windows spells the machine this way
    assert cpu_features.isa_of(full, "aarch64") == "generic"  # x86 flags mean nothing elsewhere


@pytest.fixture
def host(monkeypatch):
    """Set the host's ISA for cpu_features (host_isa is cached per process, so it is replaced); torch's own
    bf16 check says yes, as on an AVX-512 host, so only the cap can make onednn_bf16() False."""
    def set_host(isa: str) -> None:
        monkeypatch.setattr(cpu_features, "host_isa", lambda: isa)
    monkeypatch.delenv("MARSERVE_NATIVE_ISA", raising=False)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    return set_host


@pytest.mark.parametrize("host_isa", cpu_features.ISAS)
def test_no_override_acts_on_the_host_isa(host, host_isa):
    host(host_isa)
    assert cpu_features.forced_isa() is None
    assert cpu_features.isa() == host_isa
    assert not cpu_features.is_capped()


def test_onednn_bf16_follows_torch_on_an_uncapped_avx512_host(host, monkeypatch):
    host("avx512")
    assert cpu_features.onednn_bf16() is True
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert cpu_features.onednn_bf16() is False


@pytest.mark.parametrize("host_isa, forced", [("avx2", "avx512"), ("generic", "avx2"), ("generic", "avx512")])
def test_forcing_above_the_host_raises_naming_the_variable(host, monkeypatch, host_isa, forced):
    host(host_isa)
    monkeypatch.setenv("MARSERVE_NATIVE_ISA", forced)
    with pytest.raises(ValueError, match="MARSERVE_NATIVE_ISA") as e:
        cpu_features.isa()
    assert host_isa in str(e.value)


@pytest.mark.parametrize("host_isa, forced", [("avx512", "avx2"), ("avx512", "generic"), ("avx2", "generic")])
def test_forcing_below_the_host_caps_and_turns_off_onednn_bf16(host, monkeypatch, host_isa, forced):
    host(host_isa)
    monkeypatch.setenv("MARSERVE_NATIVE_ISA", forced.upper() + " ")  # case and spaces do not matter
    assert cpu_features.isa() == forced
    assert cpu_features.is_capped()
    assert cpu_features.onednn_bf16() is False  # though torch (faked) says yes
    assert "capped" in cpu_features.describe() and host_isa in cpu_features.describe()


def test_forcing_the_host_own_isa_is_no_cap(host, monkeypatch):
    host("avx2")
    monkeypatch.setenv("MARSERVE_NATIVE_ISA", "avx2")
    assert cpu_features.isa() == "avx2"
    assert not cpu_features.is_capped()


@pytest.mark.parametrize("value", ["sse4", "avx-512", "native"])
def test_an_invalid_value_raises(host, monkeypatch, value):
    host("avx512")
    monkeypatch.setenv("MARSERVE_NATIVE_ISA", value)
    with pytest.raises(ValueError, match="MARSERVE_NATIVE_ISA.*expected one of generic, avx2, avx512"):
        cpu_features.isa()


@pytest.mark.parametrize("isa, host_isa, expected", [
    ("avx512", "avx512", ["-march=native"]),
    ("avx2", "avx2", ["-march=native"]),
    ("generic", "generic", ["-march=native"]),
    ("avx2", "avx512", ["-march=x86-64-v3", "-mtune=native"]),
    ("generic", "avx512", ["-march=x86-64", "-mtune=generic"]),
    ("generic", "avx2", ["-march=x86-64", "-mtune=generic"]),
    ("avx512", "avx2", ["-march=x86-64-v4", "-mtune=native"]),  # compile-only: how tests build above the host
])
def test_isa_flags_on_x86(isa, host_isa, expected):
    assert native_build.isa_flags(isa, host_isa, machine="x86_64") == expected


@pytest.mark.parametrize("machine", ["aarch64", "arm64", "ppc64le"])
def test_isa_flags_elsewhere_are_the_compiler_baseline(machine):
    assert native_build.isa_flags("generic", "generic", machine=machine) == []
