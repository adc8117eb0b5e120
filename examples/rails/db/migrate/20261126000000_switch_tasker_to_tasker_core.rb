# Points the Tasker SQL functions at tasker_core: same names, arguments and rows, computed in
# Rust from readiness state that triggers keep current. Reversible with `rails db:rollback`.
#
# Prerequisite: tasker_core is installed on the PostgreSQL server (see the tasker_core README).
# `enable_extension` needs a superuser the first time; if your migration user is not one, have
# a DBA run `CREATE EXTENSION tasker_core;` once and this migration will find it.
class SwitchTaskerToTaskerCore < ActiveRecord::Migration[6.1]
  def up
    enable_extension "tasker_core" unless extension_enabled?("tasker_core")
    execute "SELECT tasker_core.switch_over()"
  end

  def down
    execute "SELECT tasker_core.switch_back()"
  end
end
