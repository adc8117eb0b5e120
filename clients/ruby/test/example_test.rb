require_relative "test_helper"
require "open3"

# example.rb (the README's example) runs as written and exits 0.
class ExampleTest < Minitest::Test
  ROOT = File.expand_path("..", __dir__)

  def test_the_readme_shows_example_rb
    readme = File.read(File.join(ROOT, "README.md"))
    assert_includes readme, "```ruby\n#{File.read(File.join(ROOT, "example.rb"))}```\n"
    assert_includes 10..20, File.readlines(File.join(ROOT, "example.rb")).size
  end

  def test_example_runs_as_written
    c = TestDB.config(TestDB.name)
    url = "postgres://#{c[:username]}@#{c[:host]}:#{c[:port]}/#{c[:database]}"
    2.times do # twice: registering the template again replaces it
      out, status = Open3.capture2e({ "DATABASE_URL" => url }, RbConfig.ruby, File.join(ROOT, "example.rb"))
      assert status.success?, out
      assert_match(/^task \d+ complete: #{Regexp.escape(%({"greet"=>{"text"=>"Hello, Ada"}, "shout"=>{"text"=>"HELLO, ADA"}}))}$/, out)
    end
  end
end
