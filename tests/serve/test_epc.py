"""The enclave memory model: simulated host registry, paging delay, real-SGX readers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from veil.errors import ConfigError, InputError
from veil.serve.epc import (
    PagingModel,
    SgxEpcReader,
    SimulatedEpcHost,
    list_hosts,
    open_epc,
    read_host_registry,
)


def test_no_delay_while_enclaves_fit(tmp_path: Path) -> None:
    a = SimulatedEpcHost(tmp_path, "h0", "w0", 40, epc_mb=100, cache_s=0)
    b = SimulatedEpcHost(tmp_path, "h0", "w1", 60, epc_mb=100, cache_s=0)
    assert a.paging_pressure() == 0.0 and a.paging_delay_s() == 0.0
    assert b.usage().used_mb == 100 and b.usage().free_mb == 0
    assert a.usage().simulated and a.usage().source == "simulated"


def test_delay_proportional_to_overflow_and_shared_across_workers(tmp_path: Path) -> None:
    model = PagingModel(fault_s_per_mb=0.002)
    ws = [SimulatedEpcHost(tmp_path, "h0", f"w{i}", 50, epc_mb=100, model=model, cache_s=0) for i in range(3)]
    # 150 MiB on a 100 MiB EPC: overflow 50, resident fraction 2/3
    u = ws[0].usage()
    assert u.pressure == pytest.approx(0.5)
    assert u.delay_s == pytest.approx(0.002 * 50 * (1 - 100 / 150))
    # another host is independent
    other = SimulatedEpcHost(tmp_path, "h1", "w9", 50, epc_mb=100, model=model, cache_s=0)
    assert other.paging_delay_s() == 0.0
    # a 4th enclave raises everyone's delay; closing two brings it back to 0
    w3 = SimulatedEpcHost(tmp_path, "h0", "w3", 50, epc_mb=100, model=model, cache_s=0)
    assert ws[1].paging_pressure() == pytest.approx(1.0)
    assert ws[1].paging_delay_s() == pytest.approx(0.002 * 50 * 0.5)
    w3.close()
    ws[2].close()
    assert ws[0].paging_delay_s() == 0.0
    hosts = {h.host: h for h in list_hosts(tmp_path)}
    assert hosts["h0"].used_mb == 100 and hosts["h1"].free_mb == 50


def test_delay_is_capped_and_cached(tmp_path: Path) -> None:
    t = [0.0]
    m = PagingModel(fault_s_per_mb=1.0, max_delay_s=0.25)
    a = SimulatedEpcHost(tmp_path, "h", "a", 80, epc_mb=100, model=m, clock=lambda: t[0], cache_s=1.0)
    assert a.paging_delay_s() == 0.0
    SimulatedEpcHost(tmp_path, "h", "b", 80, epc_mb=100, model=m)
    assert a.paging_delay_s() == 0.0  # cached reading
    t[0] = 2.0
    assert a.paging_delay_s() == 0.25


def test_dead_process_entries_are_pruned(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(proc.stdout)
    SimulatedEpcHost(tmp_path, "h", "ghost", 500, epc_mb=100, pid=dead_pid)
    live = SimulatedEpcHost(tmp_path, "h", "live", 10, epc_mb=100, cache_s=0)
    assert live.paging_pressure() == 0.0
    assert read_host_registry(tmp_path, "h").enclaves == {"live": 10.0}


def test_bad_names_and_params(tmp_path: Path) -> None:
    with pytest.raises(InputError):
        SimulatedEpcHost(tmp_path, "../etc", "w", 1)
    with pytest.raises(ConfigError):
        SimulatedEpcHost(tmp_path, "h", "w", 1, epc_mb=0)
    with pytest.raises(ConfigError):
        PagingModel(working_set=0)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "epc.json").write_text("{nope")
    with pytest.raises(InputError, match="unreadable"):
        read_host_registry(tmp_path, "bad")


def test_open_epc_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VEIL_SIM_EPC_MB", "64")
    monkeypatch.setenv("VEIL_SIM_EPC_DIR", str(tmp_path))
    monkeypatch.setenv("VEIL_SIM_HOST", "hx")
    mon = open_epc(simulated=True, worker_id="w", enclave_mb=96)
    assert mon.simulated and mon.host == "hx"
    assert mon.paging_pressure() == pytest.approx(0.5)
    mon.close()
    monkeypatch.setenv("VEIL_SIM_EPC_MB", "lots")
    with pytest.raises(ConfigError):
        open_epc(simulated=True, worker_id="w", enclave_mb=1)


def _fake_sysfs(root: Path, capacity: int, current: int, limit: str) -> Path:
    cg = root / "fs" / "cgroup"
    (cg / "kubepods" / "pod1").mkdir(parents=True)
    (cg / "misc.capacity").write_text(f"sgx_epc {capacity}\n")
    (cg / "misc.current").write_text(f"sgx_epc {current}\n")
    (cg / "kubepods" / "pod1" / "misc.current").write_text(f"sgx_epc {current}\n")
    (cg / "kubepods" / "pod1" / "misc.max").write_text(f"sgx_epc {limit}\n")
    return root


def test_sgx_misc_cgroup_reader(tmp_path: Path) -> None:
    MB = 1 << 20
    sysfs = _fake_sysfs(tmp_path, 128 * MB, 95 * MB, str(100 * MB))
    r = SgxEpcReader(sysfs=sysfs, cgroup="kubepods/pod1", host="n1", high_water=0.9)
    u = r.usage()
    assert r.source == "misc-cgroup" and not u.simulated
    assert u.epc_mb == 128 and u.used_mb == 95
    assert u.pressure == pytest.approx((95 - 90) / 10)
    assert r.paging_delay_s() == 0.0
    sysfs2 = _fake_sysfs(tmp_path / "b", 128 * MB, 10 * MB, "max")
    assert SgxEpcReader(sysfs=sysfs2, cgroup="kubepods/pod1").paging_pressure() == 0.0


def test_sgx_isgx_reader_and_no_source(tmp_path: Path) -> None:
    p = tmp_path / "module" / "isgx" / "parameters"
    p.mkdir(parents=True)
    (p / "sgx_nr_total_epc_pages").write_text("1000\n")
    (p / "sgx_nr_free_pages").write_text("0\n")
    r = SgxEpcReader(sysfs=tmp_path, cgroup="")
    assert r.source == "isgx-driver" and r.paging_pressure() == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="no EPC usage source"):
        SgxEpcReader(sysfs=tmp_path / "empty", cgroup="")
