#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the cluster tests (make test-cluster) and for trying the
# SLURM launchers by hand. Nothing of the system is changed: the slurm.conf, munge's key and socket, the
# daemons' state, logs and pid files all live in one folder, and the clients find the cluster through
# SLURM_CONF.
#
#   scripts/slurm_local.sh up [DIR]       start munged, slurmctld and slurmd; wait until the node is idle
#   scripts/slurm_local.sh status [DIR]   the daemons this folder started, and sinfo
#   scripts/slurm_local.sh down [DIR]     cancel the cluster's jobs, stop exactly what `up` started
#
# DIR defaults to $SLURM_LOCAL_DIR, else ${TMPDIR:-/tmp}/cvae-slurm-<uid>. After `up`:
#   export SLURM_CONF=DIR/slurm.conf    (the line `up` prints last)
#   cvae-train -m hydra/launcher=slurm hydra.launcher.partition=debug hydra.launcher.gpus_per_node=0 \
#     hydra.launcher.cpus_per_task=1 hydra.launcher.mem_gb=1 seed=0,1
#
# The cluster: partition `debug` with this host as its one node (its CPUs and memory as `slurmd -C` reads
# them), no accounting database (sacct has nothing to read), free TCP ports picked at start-up, daemons run
# as the current user. Needs Debian's packages: apt-get install -y slurmctld slurmd slurm-client munge.
# Exit codes: 0 done, 1 a daemon failed to start (its log's tail is printed), 2 usage, 3 packages missing.
set -euo pipefail

usage() {
	echo "usage: $0 up|down|status [DIR]" >&2
	exit 2
}
[[ $# -ge 1 && $# -le 2 ]] || usage
cmd=$1
dir=${2:-${SLURM_LOCAL_DIR:-${TMPDIR:-/tmp}/cvae-slurm-$(id -u)}}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
conf=$dir/slurm.conf
node=$(hostname -s)

missing_packages() {
	local tool pkg missing=()
	for tool in munged:munge slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client srun:slurm-client \
		sinfo:slurm-client scontrol:slurm-client; do
		pkg=${tool#*:}
		if ! command -v "${tool%%:*}" >/dev/null && ! [[ -x /usr/sbin/${tool%%:*} ]]; then
			[[ " ${missing[*]} " == *" $pkg "* ]] || missing+=("$pkg")
		fi
	done
	echo "${missing[*]}"
}

# The pid of a daemon this folder started, if it still runs (a pid file alone could name a reused pid).
running() {
	local pid
	pid=$(cat "$dir/$1.pid" 2>/dev/null) || return 1
	[[ -n $pid && -r /proc/$pid/cmdline ]] || return 1
	tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "$dir" || return 1
	echo "$pid"
}

# Whether a daemon this folder started has ended (its pid file is written a moment after it forks).
ended() {
	[[ -s $dir/$1.pid ]] && ! running "$1" >/dev/null
}

free_port() {
	python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

write_conf() {
	local user ctld_port slurmd_port hw
	user=$(id -un)
	ctld_port=$(free_port)
	slurmd_port=$(free_port)
	# "NodeName=<host> CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
	hw=$(PATH=$PATH:/usr/sbin slurmd -C | head -n 1 | sed -e 's/^NodeName=[^ ]* //')
	mkdir -p "$dir/state" "$dir/spool" "$dir/munge"
	cat >"$conf" <<EOF
# Written by scripts/slurm_local.sh for a one-node test cluster; everything it names is under $dir.
ClusterName=cvae-local
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups, no accounting: what a sandbox or a container allows
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# finished jobs stay in squeue/scontrol for 5 minutes (how launchers without sacct read their end state)
MinJobAge=300
KillWait=30
InactiveLimit=0
NodeName=$node NodeHostname=$node NodeAddr=127.0.0.1 $hw State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
	if [[ ! -s $dir/munge/munge.key ]]; then
		dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
	fi
	chmod 700 "$dir/munge"
	chmod 400 "$dir/munge/munge.key"
	# --force: the folder may sit below a world-writable one (/tmp), which munged would otherwise refuse
	PATH=$PATH:/usr/sbin munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
		--pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munge/munged.seed"
}

fail() {
	echo "slurm_local.sh: $1; the end of $2:" >&2
	tail -n 20 "$2" >&2 2>/dev/null || true
	stop_daemons
	exit 1
}

wait_idle() {
	local state i
	for i in $(seq 1 60); do
		state=$(SLURM_CONF=$conf sinfo -h -n "$node" -o %t 2>/dev/null || true)
		case $state in
		idle) return 0 ;;
		drain* | down* | fail*) fail "node $node is $state" "$dir/slurmd.log" ;;
		esac
		ended slurmctld && fail "slurmctld ended" "$dir/slurmctld.log"
		ended slurmd && fail "slurmd ended" "$dir/slurmd.log"
		sleep 0.5
	done
	fail "node $node not idle after 30 s (state: ${state:-none})" "$dir/slurmd.log"
}

up() {
	local missing
	missing=$(missing_packages)
	if [[ -n $missing ]]; then
		echo "slurm_local.sh: SLURM is not installed (missing Debian packages: $missing); install them with:" \
			"apt-get install -y slurmctld slurmd slurm-client munge" >&2
		exit 3
	fi
	if running slurmctld >/dev/null && running slurmd >/dev/null && running munged >/dev/null; then
		echo "slurm_local.sh: already up in $dir" >&2
		echo "export SLURM_CONF=$conf"
		return 0
	fi
	stop_daemons
	write_conf
	start_munge || fail "munged did not start" "$dir/munged.log"
	export SLURM_CONF=$conf # slurmd passes it on to the jobs' steps, whose clients (srun) need it
	PATH=$PATH:/usr/sbin slurmctld -c -f "$conf" || fail "slurmctld did not start" "$dir/slurmctld.log"
	PATH=$PATH:/usr/sbin slurmd -f "$conf" -N "$node" || fail "slurmd did not start" "$dir/slurmd.log"
	wait_idle
	echo "slurm_local.sh: partition debug on $node is up ($dir)" >&2
	echo "export SLURM_CONF=$conf"
}

# The cluster's jobs first (their step daemons are processes slurmd started), then the daemons, then any
# step daemon of this cluster still left (found by the SLURM_CONF it inherited).
stop_daemons() {
	local name pid i pids
	if running slurmctld >/dev/null; then
		SLURM_CONF=$conf scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
		for i in $(seq 1 40); do
			[[ -z $(SLURM_CONF=$conf squeue -h -t running,completing -o %i 2>/dev/null) ]] && break
			sleep 0.5
		done
	fi
	pids=()
	for name in slurmd slurmctld munged; do # together: each takes about 2 s to end
		pid=$(running "$name") && pids+=("$pid") && kill "$pid" 2>/dev/null || true
	done
	for pid in "${pids[@]}"; do
		for i in $(seq 1 40); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
		kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
	done
	pids=$(grep -lzF "SLURM_CONF=$conf" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3 || true)
	for pid in $pids; do
		[[ $(cat "/proc/$pid/comm" 2>/dev/null) == slurmstepd ]] && kill -9 "$pid" 2>/dev/null || true
	done
	rm -f "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munged.pid"
}

status() {
	local name pid code=0
	for name in munged slurmctld slurmd; do
		if pid=$(running "$name"); then
			echo "$name: running (pid $pid)"
		else
			echo "$name: not running"
			code=1
		fi
	done
	if [[ $code == 0 ]]; then
		SLURM_CONF=$conf sinfo
		echo "export SLURM_CONF=$conf"
	fi
	return $code
}

case $cmd in
up) up ;;
down) stop_daemons ;;
status) status ;;
*) usage ;;
esac
