// Where the bearer token comes from. The .NET build adds Azure.Identity behind this interface
// (AzureIdentityTokenSource.cs); the Mono build, which cannot reference Azure.Identity, uses these.
using System;
using System.IO;
using System.Threading;
using System.Threading.Tasks;

namespace Gateway.Client
{
    public interface ITokenSource
    {
        Task<string> GetTokenAsync(CancellationToken cancel);
    }

    /// <summary>A token from GATEWAY_TOKEN, or from the file GATEWAY_TOKEN_FILE names (read on every call, so a
    /// refreshed file is picked up).</summary>
    public sealed class EnvironmentTokenSource : ITokenSource
    {
        readonly string _token;
        readonly string _file;

        EnvironmentTokenSource(string token, string file) { _token = token; _file = file; }

        /// <summary>Null when neither variable is set.</summary>
        public static EnvironmentTokenSource FromEnvironment()
        {
            string token = Environment.GetEnvironmentVariable("GATEWAY_TOKEN");
            string file = Environment.GetEnvironmentVariable("GATEWAY_TOKEN_FILE");
            if (!string.IsNullOrEmpty(token)) return new EnvironmentTokenSource(token.Trim(), null);
            if (!string.IsNullOrEmpty(file)) return new EnvironmentTokenSource(null, file);
            return null;
        }

        public Task<string> GetTokenAsync(CancellationToken cancel)
        {
            return Task.FromResult(_token ?? File.ReadAllText(_file).Trim());
        }
    }
}
