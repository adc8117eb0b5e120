# tasker_core — the two set-up commands are `make demo` and `make test`.
# Both install whatever is missing first (Debian packages, cargo-pgrx, pgrx init, test clients).

.PHONY: demo test bench prereqs install test-core test-fuzz test-pg test-integration test-failover test-replica test-sharding bench-shards cluster-start cluster-stop fmt lint clean-cluster

demo:
	@scripts/demo.sh

test:
	@scripts/test.sh

bench:
	@scripts/bench.sh

prereqs:
	@scripts/prereqs.sh

install: prereqs
	@scripts/install.sh

test-core: prereqs
	@scripts/test.sh core

test-fuzz: prereqs
	@scripts/test.sh fuzz

test-pg: prereqs
	@scripts/test.sh pg

test-integration: prereqs
	@scripts/test.sh integration

# beyond one machine (docs/scaling.md); make test runs the three tests too
test-failover:
	@scripts/scaling.sh failover

test-replica:
	@scripts/scaling.sh replica

test-sharding:
	@scripts/scaling.sh sharding

bench-shards:
	@scripts/scaling.sh bench

cluster-start:
	@scripts/cluster.sh start

cluster-stop:
	@scripts/cluster.sh stop

fmt:
	cargo fmt --all

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

clean-cluster: cluster-stop
	TASKER_CLUSTER_DIR=target/demo-cluster scripts/cluster.sh stop
	rm -rf target/tasker-cluster target/demo-cluster target/pgrx-test
